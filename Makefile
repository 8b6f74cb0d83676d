PY := .venv/bin/python
STAMP := .venv/.installed
# pip prints a warning per unreachable local index on some machines; keep the log readable.
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test clean

$(STAMP): pyproject.toml
	python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
	$(PIP) -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import pipeline, torch, ray, transformers"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/segment_bucket.py --input pipeline/data/samples --output demo-output --previews 12
	@echo "Outputs are under $(CURDIR)/demo-output: panoptic/ (PNGs), tables/ (Parquet), coco/panoptic.json, report.json, previews/index.html"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf .venv demo-output
