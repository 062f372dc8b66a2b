import pytest

from fragcli.errors import FragError
from fragcli.seeds import parse_seeds, pick_steps


@pytest.mark.parametrize(("spec", "expected"), [("8", list(range(8))), ("3,5,9", [3, 5, 9]), ("0-3", [0, 1, 2, 3]),
                                                ("0-2,7", [0, 1, 2, 7]), ("5,5,1", [5, 1])])
def test_parse_seeds(spec, expected):
    assert parse_seeds(spec) == expected


@pytest.mark.parametrize("spec", ["", "0", "a", "3-1", "1,,2", "-4", "1.5"])
def test_bad_seeds(spec):
    with pytest.raises(FragError):
        parse_seeds(spec)


def test_pick_steps():
    assert pick_steps(10, None) == list(range(10))
    assert pick_steps(10, 3) == [0, 4, 9] or pick_steps(10, 3) == [0, 5, 9]
    geo = pick_steps(20, 5, "geometric")
    assert len(geo) == 5 and geo[0] == 0 and geo[-1] == 19
    assert geo[1] - geo[0] <= geo[-1] - geo[-2]  # dense early, sparse late
    with pytest.raises(FragError):
        pick_steps(0, None)
    with pytest.raises(FragError):
        pick_steps(10, 3, "cubic")


@pytest.mark.parametrize("spec", ["99999999999999999999", "0-99999999999999999999", "100001", "9223372036854775808"])
def test_huge_seed_requests_are_refused_not_overflowed(spec):
    with pytest.raises(FragError, match="100,000|2\\*\\*63"):
        parse_seeds(spec)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"steps": 100000}, "--steps 100000"), ({"steps": 0}, "--steps 0"), ({"guidance": float("nan")}, "--guidance nan"),
    ({"guidance": float("inf")}, "--guidance inf"), ({"width": 65536}, "--width 65536"), ({"height": 0}, "--height 0"),
    ({"width": 100}, "multiple of 8"),
])
def test_numeric_generation_options_are_bounded_before_loading(kwargs, needle):
    from fragcli.generation import check_options

    with pytest.raises(FragError, match=needle):
        check_options(**kwargs)
    check_options(steps=20, guidance=7.5, width=512, height=768)
