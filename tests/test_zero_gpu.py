"""The Space path (issue 15): the family and models from the environment alone, and ZeroGPU's conventions
checked with a stand-in `spaces` module that records which functions were decorated, with which durations,
and whether any weights were loaded inside a GPU call."""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest

from conftest import served, tiny_pixel_unet
from dmd2 import registry
from dmd2.families.pixel import save_pixel_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StandInSpaces(types.ModuleType):
    """`spaces` as ZeroGPU provides it, reduced to what we use: GPU(duration=...)(fn)."""

    def __init__(self):
        super().__init__("spaces")
        self.decorated: dict[str, object] = {}      # function name -> its duration (a number or a function)
        self.calls: list[tuple[str, int]] = []      # (function name, seconds asked for) per GPU call
        self.inside = 0                             # > 0 while a decorated function runs

    def GPU(self, fn=None, duration=None):         # noqa: N802 (the real name)
        def decorate(fn):
            self.decorated[fn.__name__] = duration

            def call(*args, **kwargs):
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                self.calls.append((fn.__name__, seconds))
                self.inside += 1
                try:
                    result = fn(*args, **kwargs)
                    if isinstance(result, types.GeneratorType):
                        result = list(result)[-1] if result else result
                    return result
                finally:
                    self.inside -= 1
            call.__name__, call.__wrapped__ = fn.__name__, fn
            import functools

            return functools.wraps(fn)(call)
        return decorate(fn) if fn is not None else decorate


@pytest.fixture
def zero_gpu(monkeypatch, tmp_path):
    """ZeroGPU switched on with the stand-in `spaces`; every model load records whether it ran in a GPU call."""
    spaces = StandInSpaces()
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_failures", {})
    loads = []
    real_init = registry.LoadedModel.__init__

    def recording_init(self, spec):
        loads.append((spec.name, spaces.inside > 0))
        real_init(self, spec)
    monkeypatch.setattr(registry.LoadedModel, "__init__", recording_init)
    teacher, student = tmp_path / "tiny-teacher", tmp_path / "tiny-student"
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, teacher)
    save_pixel_unet(unet, student, timesteps=[999])
    # a 2-step student whose own teacher is not a panel: Compare's "Teacher first" needs it loaded at start too
    save_pixel_unet(unet, tmp_path / "own-teacher")
    save_pixel_unet(unet, tmp_path / "tiny-2step", timesteps=[999, 499], teacher=str(tmp_path / "own-teacher"))
    return spaces, loads, [str(teacher), str(student), str(tmp_path / "tiny-2step")]


def test_zero_gpu_loads_at_start_decorates_sampling_with_sized_durations_and_disables_training(zero_gpu, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from dmd2.ui.app import build_app

    spaces, loads, models = zero_gpu
    demo = build_app(models, votes_path=tmp_path / "votes.sqlite", runs_root=tmp_path / "runs")
    assert sorted(name for name, _ in loads) == sorted([*models, str(tmp_path / "own-teacher")])
    assert not any(inside for _, inside in loads)
    assert {"run", "run_more", "start"} <= set(spaces.decorated)      # Compare, Compare's runs, Arena rounds
    with served(demo) as url:
        client = Client(url, verbose=False)
        client.predict(0, 0, 2, 50, 1.0, api_name="/compare")
        client.predict(0, 0, 2, 4, 1.0, api_name="/compare")
        client.predict(0, 0, 16, 50, 1.0, api_name="/compare")
        hybrid = client.predict(0, 0, 16, 50, 1.0, None, "499", api_name="/compare")
        assert "(teacher first: 25 steps at w=1 down to t=499, NFE 25; then 1 student step)" in hybrid[5]
        client.predict("1", api_name="/new_round")
        with pytest.raises(AppError, match="Training is disabled on ZeroGPU"):
            client.predict("mnist-1step", "x", {}, "", "", api_name="/train_launch")
    assert not any(inside for _, inside in loads)                   # nothing loaded inside a GPU call
    compare_50, compare_4, plain_16, hybrid_16 = [s for name, s in spaces.calls if name == "run"]
    assert compare_50 >= compare_4 >= 15                              # more teacher steps ask for more time
    assert hybrid_16 > plain_16 > compare_50                          # the hybrid's teacher steps are asked for
    assert [name for name, _ in spaces.calls].count("start") == 1


def test_durations_grow_with_the_work():
    from dmd2.ui.gpu import MAX_SECONDS, sampling_seconds

    teacher = registry.spec_for("sdxl-teacher")
    student = registry.BUILTIN["dmd2-sdxl-4step"]
    one = sampling_seconds([student], images=1)
    assert sampling_seconds([teacher], images=4, teacher_steps=50) > sampling_seconds([teacher], images=4,
                                                                                      teacher_steps=10) > one
    assert sampling_seconds([teacher, student], images=4) > sampling_seconds([teacher], images=4)
    assert sampling_seconds([teacher] * 20, images=16) == MAX_SECONDS
    # Compare's teacher-then-student: a 4-step student taking t = 499 pays its teacher's steps too; a 1-step one,
    # or a t it does not have, does not
    one_step = registry.BUILTIN["dmd2-sdxl-1step"]
    assert sampling_seconds([student], images=4, teacher_steps=50, teacher_until=499) > sampling_seconds(
        [student], images=4, teacher_steps=50)
    assert sampling_seconds([student], images=4, teacher_until=500) == sampling_seconds([student], images=4)
    assert sampling_seconds([one_step], images=4, teacher_until=499) == sampling_seconds([one_step], images=4)


def test_without_spaces_gpu_returns_the_function_itself(monkeypatch):
    from dmd2.ui.gpu import gpu, on_zero_gpu

    monkeypatch.setitem(sys.modules, "spaces", None)                  # `import spaces` fails
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def fn():
        return 1
    assert gpu(fn, duration=30) is fn and not on_zero_gpu()


def test_family_and_models_come_from_the_environment(monkeypatch, tmp_path):
    """`DMD2_FAMILY=sdxl DMD2_MODELS=<tiny pipeline> python app.py` serves the SDXL tabs: app.py's checks see the
    environment's family and models (a pixel model under DMD2_FAMILY=sdxl is refused, naming both)."""
    import subprocess

    save_pixel_unet(tiny_pixel_unet(), tmp_path / "tiny-teacher")
    env = dict(os.environ, DMD2_FAMILY="sdxl", DMD2_MODELS=f"{tmp_path / 'tiny-teacher'}",
               DMD2_VOTES=str(tmp_path / "votes.sqlite"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--port", "1"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "is a pixel model; this app serves --family sdxl" in p.stderr
    env["DMD2_FAMILY"] = "kandinsky"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "DMD2_FAMILY='kandinsky': choose one of pixel, sdxl, sd15, sd3, flux" in p.stderr


def test_app_py_serves_sdxl_from_the_environment_alone(tmp_path):
    """`DMD2_FAMILY=sdxl DMD2_MODELS=<tiny SDXL pipeline> python app.py`: the SDXL tabs, a prompt in Compare."""
    import signal
    import subprocess
    import time

    import tiny_sd
    from conftest import free_port
    from gradio_client import Client

    pipeline = tiny_sd.make_tiny_sdxl(tmp_path / "tiny-sdxl")
    port = free_port()
    env = dict(os.environ, DMD2_FAMILY="sdxl", DMD2_MODELS=str(pipeline), DMD2_VOTES=str(tmp_path / "votes.sqlite"),
               DMD2_RUNS=str(tmp_path / "runs"), GRADIO_ANALYTICS_ENABLED="False")
    env.pop("SPACES_ZERO_GPU", None)
    app = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--port", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300                                 # a hang guard, not a timing check
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "dl"))
                break
            except Exception:
                assert app.poll() is None, app.stdout.read().decode()
                assert time.monotonic() < deadline, "app.py did not come up"
                time.sleep(1)
        out = client.predict("a photo of a cat", 5, 1, 1, 1.0, api_name="/compare")
        assert out[1].startswith("tiny-sdxl: NFE 1, steps 1, ")          # the prompt went to the SDXL teacher
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(60)
