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
