from schemas import generate


def test_checked_in_json_schemas_are_current() -> None:
    for name, struct in generate.FILES.items():
        path = generate.HERE / name
        assert path.read_bytes() == generate.render(struct), f"{name} is stale: run `make schemas`"
