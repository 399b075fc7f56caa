"""Arena tab: two anonymous models, same class and seed, a human vote, then the names.

The pure part is `Arena` (draw a battle, generate both sides, issue a token; verify a token,
record the vote, reveal the names). The server keeps every battle in a `BattleBook`; a
client only ever holds the opaque token (`gr.State` in the browser UI). A battle stays in
the book after its vote (until it expires), so a replayed token reaches the vote store and
gets a clear "already voted" instead of "unknown battle"; the store's UNIQUE battle id is
what makes the vote count once.

Endpoints for gradio_client: `/new_round` (class or "random" -> token, image A, image B, ...)
and `/vote` (token, outcome in a / b / tie / both_bad -> the revealed battle as a dict).

Optional Hugging Face login: with a `gr.LoginButton` in the tab (on a Space with `hf_oauth: true`, or
whenever login is required), the vote handlers take a `gr.OAuthProfile | None` that Gradio injects from
the session. A logged-in voter's first id is its Hugging Face user (`hf:<sub>`), so the limits count it and
the vote row keeps it (hashed with the store's salt), and it has a daily cap ($DMD2_DAILY_VOTES, default
200 per rolling 24 h). With $DMD2_REQUIRE_LOGIN=1 a logged-out vote is refused; without it the
per-client limits (session, address) are all a logged-out voter gets.
"""

# No `from __future__ import annotations` here: gr.api reads the vote endpoint's type hints
# with typing.get_type_hints, which cannot resolve a string "gr.Request" in this module.

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dmd2 import registry
from dmd2.arena import BattleBook, DuplicateVote, InvalidToken, NotVotable, RateLimited, VoteStore, new_battle
from dmd2.arena.store import OUTCOMES, DailyCapReached, daily_votes_from_env
from dmd2.batching import Batcher, Request
from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import PixelFamily
from dmd2.guidance import entry_name, parse_entry
from dmd2.prompts import check_prompt, example_prompts
from dmd2.ui.auth import client_address
from dmd2.ui.widgets import (DISPLAY_SCALE, GUIDED_W_LABEL, GUIDED_W_STEP, check_guided_w, conditioning, display_name,
                             guided_students, guided_w_control, make_grid, prompt_box, public_message)

IMAGES_PER_SIDE = 4          # a 2 x 2 grid per side: one digit is too little to judge a model by
RANDOM = "random"
BUTTONS = (("A is better", "a"), ("B is better", "b"), ("Tie", "tie"), ("Both bad", "both_bad"))
OUTCOME_TEXT = {"a": "A is better", "b": "B is better", "tie": "a tie", "both_bad": "both bad"}
REQUIRE_LOGIN_ENV = "DMD2_REQUIRE_LOGIN"
LOGIN_REQUIRED = ("Log in with Hugging Face to vote (the \"Sign in with Hugging Face\" button at the top of "
                  "the Arena tab): this arena counts only logged-in votes.")
_FROM_ENV = object()
log = logging.getLogger("dmd2.ui")


def require_login_from_env() -> bool:
    """$DMD2_REQUIRE_LOGIN: 1 / true / yes: only logged-in users vote; unset, 0 / false / no: anyone."""
    raw = os.environ.get(REQUIRE_LOGIN_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{REQUIRE_LOGIN_ENV}={raw!r} must be 1 or 0")


def login_available() -> bool:
    """Is Hugging Face login set up here? On a Space with `hf_oauth: true` the Hub sets $OAUTH_CLIENT_ID."""
    return bool(os.environ.get("OAUTH_CLIENT_ID"))


def oauth_missing() -> list[str]:
    """The packages Gradio's login needs that are not installed (gradio[oauth]: itsdangerous for the session
    cookie, and on a Space authlib for the real OAuth flow)."""
    import importlib.util

    from gradio.utils import get_space

    needed = ["itsdangerous"] + (["authlib"] if get_space() is not None else [])
    return [m for m in needed if importlib.util.find_spec(m) is None]


def user_id(profile) -> str | None:
    """The stable id of a logged-in Hugging Face user (`gr.OAuthProfile`, a dict of the OpenID userinfo):
    its `sub` (which a rename keeps), else its username; None when logged out."""
    if profile is None:
        return None
    uid = profile.get("sub") or getattr(profile, "username", None) or profile.get("preferred_username")
    return str(uid) if uid else None


class VoteRejected(Exception):
    """A vote that was not recorded; `reason` is invalid_token, already_voted, rate_limited, bad_outcome,
    login_required or daily_cap."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


@dataclass
class Round:
    """What the client sees of a new battle: a token (None when it cannot be voted on), two images, text."""

    token: str | None
    prompt: str
    image_a: np.ndarray | None
    image_b: np.ndarray | None
    message: str

    @property
    def votable(self) -> bool:
        return self.token is not None


@dataclass
class Verdict:
    """A recorded vote with the names revealed (display names: no server paths reach the client)."""

    model_a: str
    model_b: str
    outcome: str
    prompt: str
    seed: int
    message: str

    def as_dict(self) -> dict:
        return dict(model_a=self.model_a, model_b=self.model_b, outcome=self.outcome,
                    prompt=self.prompt, seed=self.seed, message=self.message)


def parse_class(value, num_classes: int, rng: np.random.Generator) -> int:
    """A class index from the user's choice: None / "random" draws one, else an integer in [0, num_classes)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", RANDOM)):
        return int(rng.integers(num_classes))
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"class must be 'random' or an integer 0..{num_classes - 1}, got {value!r}") from None
    if isinstance(value, bool) or not f.is_integer() or not 0 <= f < num_classes:
        raise ValueError(f"class must be 'random' or an integer 0..{num_classes - 1}, got {value!r}")
    return int(f)


def parse_outcome(value) -> str:
    """One of OUTCOMES from a client's string (case and surrounding spaces ignored); VoteRejected otherwise."""
    outcome = value.strip().lower() if isinstance(value, str) else value
    if outcome not in OUTCOMES:
        raise VoteRejected("bad_outcome", f"outcome must be one of {', '.join(OUTCOMES)}, got {value!r}")
    return outcome


def client_ids(request, user: str | None = None) -> list[str]:
    """Who votes, for the rate limits: the Gradio session, the client's address and the logged-in user.

    `user`: the Hugging Face user id (`user_id(profile)`) when logged in: it then comes first (`hf:<id>`), so
    the vote row keeps it and the daily cap counts it.

    The vote store limits each id on its own. The session (one per page load or Client) is chosen by the
    client, so a script gets a fresh one per vote for free; the address (`client_address`: behind a
    Space's proxy the forwarded one) and the user (`request.username`, None unless logged in) it cannot
    change cheaply. The session comes first: it is the id a vote row keeps (hashed).
    """
    hf = [f"hf:{user}"] if user else []
    if request is None:
        return hf or ["anonymous"]
    session = getattr(request, "session_hash", None)
    address = client_address(request)
    user = getattr(request, "username", None)
    ids = [f"session:{session}" if session else None, f"address:{address}" if address else None,
           f"user:{user}" if user else None]
    return hf + [i for i in ids if i] or ["anonymous"]


BF16_ENV = "DMD2_ARENA_BF16"


def bf16_default() -> bool:
    """$DMD2_ARENA_BF16 (1/0) if set; else bf16 on a CPU that has bf16 units (no GPU), where it halves a round."""
    raw = os.environ.get(BF16_ENV, "").strip().lower()
    if raw:
        if raw not in ("0", "1", "true", "false"):
            raise ValueError(f"{BF16_ENV}={raw!r} must be 1 or 0")
        return raw in ("1", "true")
    import torch

    from dmd2.sampling import bf16_is_native

    return not torch.cuda.is_available() and bf16_is_native("cpu")


class Arena:
    """Battles between `models` (registry names or folders); votes go to `store` (or a function giving it).

    `models` may be a function giving the current list, read on every round: a training run that
    finishes while the app is up joins the arena without a restart.
    `require_login` (default $DMD2_REQUIRE_LOGIN): refuse votes without a user; `daily_votes` (default
    $DMD2_DAILY_VOTES, 200; None: no cap): a logged-in user's votes per rolling 24 h. `bf16` (default
    `bf16_default()`): sample both sides under bf16 autocast, about twice as fast on a CPU with bf16 units;
    both sides alike, so a battle stays fair. `batcher` (default None: each round samples on its own):
    a `dmd2.batching.Batcher` that samples concurrent rounds' requests for the same model as one batch.
    """

    def __init__(self, models: "Sequence[str] | Callable[[], Sequence[str]]",
                 store: "VoteStore | Callable[[], VoteStore]",
                 book: BattleBook | None = None, rng: np.random.Generator | None = None,
                 images_per_side: int = IMAGES_PER_SIDE, mode: str | None = None,
                 require_login: bool | None = None, daily_votes=_FROM_ENV, bf16: bool | None = None,
                 batcher: Batcher | None = None):
        self.require_login = require_login_from_env() if require_login is None else bool(require_login)
        self.daily_votes = daily_votes_from_env() if daily_votes is _FROM_ENV else daily_votes
        self._models = models if callable(models) else list(models)
        self.mode = mode or conditioning(self.models)     # "class": battles on a class; "text": on a prompt
        self._store = store
        self.book = BattleBook() if book is None else book
        self.rng = np.random.default_rng() if rng is None else rng
        self.images_per_side = images_per_side
        self.bf16 = bf16_default() if bf16 is None else bool(bf16)
        self.batcher = batcher
        self._rng_lock = threading.Lock()      # numpy Generators are not thread-safe

    @property
    def models(self) -> list[str]:
        """The models battles are drawn from, now (duplicates dropped)."""
        return list(dict.fromkeys(self._models() if callable(self._models) else self._models))

    @property
    def store(self) -> VoteStore:
        return self._store if isinstance(self._store, VoteStore) else self._store()

    def num_classes(self) -> int:
        """Classes every loadable model knows (the smallest count), the family default if none loads."""
        counts = []
        for name in self.models:
            try:
                counts.append(registry.load(name).num_classes)
            except Exception:
                continue
        return min(counts) if counts else PixelFamily().num_classes

    def entries(self, guidance=None) -> list[str]:
        """The contestants: the models, each guidance-conditioned student as `entry_name(model, w)` at
        `guidance` (None: its own default w), which must lie inside every such student's range."""
        models = self.models
        w = check_guided_w(guidance, guided_students(models))
        out = []
        for name in models:
            try:
                m = registry.load(name)
            except Exception:     # drawn as it is; its side reports the failure
                out.append(name)
                continue
            out.append(entry_name(name, m.guidance_default if w is None else w) if m.guided else name)
        return out

    def _sides(self, names: Sequence[str], label, seed: int) -> list[tuple[np.ndarray | None, str | None]]:
        """(grid, None) or (None, error) per side; teachers use their default steps and guidance, a
        guidance-conditioned student the w of its entry (`entry_name`).
        `label` is a class (class mode) or the prompt (text mode). With a `batcher` both sides are sampled
        at once, each in a batch with other rounds' requests for its model (same images as alone)."""
        requests, errors = [], []
        for entry in names:
            try:
                name, w = parse_entry(entry)
                m = registry.load(name)
                if self.mode == "class" and label >= m.num_classes:
                    raise ValueError(f"class {label} is outside the model's 0..{m.num_classes - 1}")
                requests.append(Request(m, [label] * self.images_per_side, seed, self.bf16, guidance=w))
                errors.append(None)
            except Exception as e:     # one broken model must not take the server down
                requests.append(None)
                errors.append(e)
        todo = [r for r in requests if r is not None]
        if self.batcher is not None:
            self.batcher.sample(todo)
        else:
            for r in todo:
                try:
                    r.images = r.model.generate(r.labels, r.seed, autocast=r.autocast, guidance=r.guidance).images
                except Exception as e:     # noqa: BLE001 - reported as this side's failure
                    r.error = e
        sides = []
        for r, e in zip(requests, errors):
            e = e if r is None else r.error
            if e is not None:
                sides.append((None, public_message(e if isinstance(e, (ModelLoadError, ValueError))
                                                   else f"{type(e).__name__}: {e}")))
                continue
            grid = make_grid(r.images, scale=DISPLAY_SCALE if self.mode == "class" else 1)
            sides.append(((grid[..., 0] if grid.shape[-1] == 1 else grid), None))    # grayscale: H x W for PIL
        return sides

    def check_prompt(self, prompt) -> str:
        """The cleaned prompt, checked against every loadable model's text encoder (ValueError says what is wrong)."""
        prompt = check_prompt(prompt)
        for name in self.models:
            try:
                m = registry.load(name)
            except Exception:     # that side will report its own failure
                continue
            prompt = m.check_prompt(prompt)
        return prompt

    def new_round(self, label=None, guidance=None) -> Round:
        """Draw two distinct models (random sides), a class (unless given) and a seed; generate both.
        In text mode `label` is the prompt (required). `guidance`: the w of guidance-conditioned students
        (None: each its own default); such a student enters the battle as `entry_name(model, w)`.

        Raises ValueError for fewer than two models, a bad class or a bad prompt. A side that fails
        gives a Round without a token and a message saying which side failed and why.
        """
        models = self.entries(guidance)
        if len(models) < 2:
            raise ValueError(f"the arena needs at least two models, got {len(models)}: "
                             "train or download another one first")
        if self.mode == "text":
            label = self.check_prompt(label)
        with self._rng_lock:
            if self.mode == "class":
                label = parse_class(label, self.num_classes(), self.rng)
            battle = new_battle(models, str(label), self.rng)
        (battle.image_a, battle.error_a), (battle.image_b, battle.error_b) = \
            self._sides((battle.model_a, battle.model_b), label, battle.seed)
        try:
            token = self.book.issue(battle)
        except NotVotable:
            failed = [f"side {s} failed to generate ({e})" for s, e in (("A", battle.error_a),
                                                                       ("B", battle.error_b)) if e]
            return Round(None, battle.prompt, battle.image_a, battle.image_b,
                         "This round cannot be voted on: " + "; ".join(failed) + ". Start a new round.")
        if self.mode == "text":
            return Round(token, battle.prompt, battle.image_a, battle.image_b,
                         "Same prompt, same seed for both sides. Which side shows it better?")
        return Round(token, battle.prompt, battle.image_a, battle.image_b,
                     f"Class **{label}**, same seed for both. Which side drew it better?")

    def vote(self, token, outcome, client: "str | Sequence[str]", user: str | None = None) -> Verdict:
        """Verify the token, record the vote once, reveal the names; VoteRejected says why a vote is refused.
        `client`: the voter's id, or its ids (`client_ids`), each rate-limited. `user`: the logged-in
        Hugging Face user's id (`user_id`), None when logged out: its votes are capped per day, and with
        `require_login` a vote without one is refused."""
        outcome = parse_outcome(outcome)
        if user is None and self.require_login:
            raise VoteRejected("login_required", LOGIN_REQUIRED)
        ids = [client] if isinstance(client, str) else list(client)
        if user is not None:               # the user's id first: the one the row keeps and the cap counts
            ids = [f"hf:{user}"] + [i for i in ids if i != f"hf:{user}"]
        try:
            battle = self.book.verify(token)
        except InvalidToken as e:
            raise VoteRejected("invalid_token", f"Vote rejected: {e}.") from e
        try:
            self.store.record(battle["battle_id"], battle["model_a"], battle["model_b"], battle["prompt"],
                              battle["seed"], outcome, ids,
                              daily_limit=self.daily_votes if user is not None else None)
        except DuplicateVote as e:
            raise VoteRejected("already_voted", "You already voted on this battle; it counts once. "
                               "Start a new round to vote again.") from e
        except RateLimited as e:
            raise VoteRejected("rate_limited", f"Too many votes: at most {e.max_votes} per {e.window_s:g} s. "
                               f"Try again in {max(e.retry_after_s, 1.0):.0f} s.", e.retry_after_s) from e
        except DailyCapReached as e:
            raise VoteRejected("daily_cap", f"Daily vote cap reached: at most {e.cap} votes per user in 24 hours. "
                               f"Try again in {max(e.retry_after_s / 3600, 0.1):.1f} h.", e.retry_after_s) from e
        a, b = display_name(battle["model_a"]), display_name(battle["model_b"])
        what = "the same prompt" if self.mode == "text" else f"class {battle['prompt']}"
        message = (f"Vote recorded ({OUTCOME_TEXT[outcome]}). **A** was **{a}**, **B** was **{b}** "
                   f"({what}, seed {battle['seed']}).")
        return Verdict(a, b, outcome, battle["prompt"], int(battle["seed"]), message)


def build_arena_tab(arena: Arena, wrap: Callable = lambda f: f, login: bool | None = None) -> dict:
    """The Arena tab (inside an open gr.Blocks); `wrap` decorates the sampling function (spaces.GPU).

    `login`: show a `gr.LoginButton` (Hugging Face OAuth); default: when the arena requires login or the
    Space has OAuth set up (`login_available`). Off a Space, Gradio mocks the login with the machine's own
    Hugging Face account, which must then be logged in (`hf auth login`).
    """
    import gradio as gr

    text = arena.mode == "text"
    login = (arena.require_login or login_available()) if login is None else login
    missing = oauth_missing() if login else []
    if missing and arena.require_login:
        raise RuntimeError(f"{REQUIRE_LOGIN_ENV}=1 needs Gradio's login, which needs {', '.join(missing)}: "
                           "pip install 'gradio[oauth]'")
    if missing:
        log.warning("no Hugging Face login in the Arena: %s not installed (pip install 'gradio[oauth]')",
                    ", ".join(missing))
        login = False
    with gr.Tab("Arena", id="arena"):
        gr.Markdown(f"Two anonymous models draw the same {'prompt' if text else 'digit class'} from the same "
                    "seed. Vote for the better side; the names are revealed after your vote.")
        login_button = None
        if login:
            login_button = gr.LoginButton(elem_id="arena-login")
            gr.Markdown("**Log in with Hugging Face to vote.**" if arena.require_login else
                        "Logging in with Hugging Face is optional; it makes your votes count as one person's.",
                        elem_id="arena-login-note")
        examples = example_prompts() if text else []
        with gr.Row():
            if text:
                label = prompt_box(examples)
            else:
                choices = [("Random", RANDOM)] + [(str(i), str(i)) for i in range(arena.num_classes())]
                label = gr.Dropdown(choices=choices, value=RANDOM, label="Class")
            new = gr.Button("New round", variant="primary")
        inputs = [label]
        guided = guided_students(arena.models)
        if guided:            # a guidance-conditioned student is served: one w for all of them, within their range
            inputs.append(gr.Slider(step=GUIDED_W_STEP, label=f"{GUIDED_W_LABEL} (the Leaderboard rates each w apart)",
                                    elem_id="arena-guidance", **guided_w_control(guided)))
        if text:
            gr.Examples([[p] for p in examples], inputs=[label], label="Example prompts")
        if len(arena.models) < 2:
            gr.Markdown(f"**The arena needs at least two models**; {len(arena.models)} available.")
        info = gr.Markdown()
        with gr.Row():
            image_a = gr.Image(label="A", type="numpy", format="png", interactive=False,
                               buttons=["fullscreen"], elem_id="arena-image-a")
            image_b = gr.Image(label="B", type="numpy", format="png", interactive=False,
                               buttons=["fullscreen"], elem_id="arena-image-b")
        with gr.Row():
            buttons = [gr.Button(text, interactive=False, elem_id=f"arena-vote-{outcome}")
                       for text, outcome in BUTTONS]
        reveal = gr.Markdown()
        token_state = gr.State(None)          # the browser session holds only the opaque token
        # The same token as an output an API client can read (gr.State is never sent to clients).
        token_box = gr.Textbox(visible=False, label="battle token")

        def start(choice, guidance=None):
            try:
                r = arena.new_round(choice, guidance)
            except ValueError as e:
                raise gr.Error(str(e)) from None
            if not r.votable:
                gr.Warning(r.message)
            return [r.token, r.token or "", r.image_a, r.image_b, r.message, ""] + \
                [gr.Button(interactive=r.votable) for _ in buttons]

        def cast(token, outcome, request: gr.Request, profile: gr.OAuthProfile | None):
            if not token:
                raise gr.Error("No battle to vote on: press New round first.")
            try:
                user = user_id(profile)
                v = arena.vote(token, outcome, client_ids(request, user), user)
            except VoteRejected as e:
                raise gr.Error(str(e)) from None
            return [v.message] + [gr.Button(interactive=False) for _ in buttons]

        new.click(wrap(start), inputs, [token_state, token_box, image_a, image_b, info, reveal, *buttons],
                  api_name="new_round")
        for button, (_, outcome) in zip(buttons, BUTTONS):
            # Callable by clients but not in the API docs: lets a test drive the session-state path.
            button.click(_bind(cast, outcome), [token_state], [reveal, *buttons],
                         api_name=f"vote_button_{outcome}", api_visibility="undocumented")

        def vote(token: str, outcome: str, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
            """Vote on a battle: `token` from /new_round, `outcome` one of a, b, tie, both_bad."""
            try:
                user = user_id(profile)
                return arena.vote(token, outcome, client_ids(request, user), user).as_dict()
            except VoteRejected as e:
                raise gr.Error(str(e)) from None

        gr.api(vote, api_name="vote")
    return dict(label=label, new=new, image_a=image_a, image_b=image_b, info=info, buttons=buttons,
                reveal=reveal, token=token_state, login=login_button, vote=vote, cast=cast)


def _bind(cast: Callable, outcome: str) -> Callable:
    """`cast` with the button's outcome fixed, keeping the gr.Request and gr.OAuthProfile parameters visible
    to Gradio (it injects them by type hint)."""
    import gradio as gr

    def on_click(token, request: gr.Request, profile: gr.OAuthProfile | None):
        return cast(token, outcome, request, profile)
    return on_click
