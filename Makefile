PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/segment_bucket.py --input pipeline/data/samples --output demo-output
	@echo "Outputs are under $(CURDIR)/demo-output"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .venv demo-output
