# Developer recipes. `just setup` once, then `just test`, `just train`, `just bench`.

venv := ".venv/bin/"

setup:
    python3 -m venv .venv && {{venv}}pip install -q -e '.[test]' ruff

train *ARGS:
    {{venv}}python -m olmo_fn.run train {{ARGS}}

test *ARGS:
    {{venv}}python -m pytest -q {{ARGS}}

bench *ARGS:
    {{venv}}python -m olmo_fn.run bench {{ARGS}}

lint:
    {{venv}}ruff check olmo_fn tests && {{venv}}ruff format --check olmo_fn tests
