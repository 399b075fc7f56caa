# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-slow install clean-venv browser rebuild-4step

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) app.py

# The browser first: without Chromium the test run stops in its first seconds, saying what to run.
browser:
	bash scripts/ensure_chromium.sh

test: browser $(STAMP)
	$(PY) -m pytest -q

# Real-size UNets with random weights (tests/test_real_size.py: ~2 min, peak RSS 19.2 GiB); skipped by `make test`
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean-venv:
	rm -rf .venv

# The embedded 4-step student from scratch (four stages, about 100 min on one thread): runs/rebuild-4step/
rebuild-4step: $(STAMP)
	$(PY) scripts/rebuild_4step.py
