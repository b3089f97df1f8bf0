.PHONY: install test demo cuda-test

install:
	bash scripts/install.sh

# Set up on a fresh machine and pass every CPU test.
test: install
	bash scripts/test.sh

# Set up and run the main job on the built-in tiny default (no downloads).
demo: install
	python3 examples/quickstart.py

# On a GPU machine, after `make install`.
cuda-test:
	python3 -m pytest -m cuda tests
