"""A profile is checked on the way in: damaged or hand-edited tables are refused, never scored."""

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fragcli.errors import FragError
from fragcli.profiling.data import read_profile
from tests.helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    prof = tmp_path_factory.mktemp("pd") / "profile"
    r = run_cli("profile", "a red circle", "-m", "tiny", "--seeds", "0,1", "--steps", "2", "--out", prof)
    assert r.exit_code == 0, r.output
    return prof


def _mutate(src, dst, fn):
    shutil.copytree(src, dst)
    table = pq.read_table(dst / "profile.parquet")
    pq.write_table(fn(table), dst / "profile.parquet")
    return dst


def _set(table, name, array):
    return table.set_column(table.column_names.index(name), name, array)


@pytest.mark.parametrize(("fn", "needle"), [
    (lambda t: _set(t, "energy_post", pc.multiply(t["energy_post"], float("nan"))), "NaN, infinite or negative energy_post"),
    (lambda t: _set(t, "energy_pre", pc.negate(t["energy_pre"])), "negative energy_pre"),
    (lambda t: _set(t, "head", pc.add(t["head"], pa.scalar(100, pa.int32()))), "head indices outside"),
    (lambda t: _set(t, "head", pc.cast(t["head"], pa.string())), "column head has type string"),
    (lambda t: _set(t, "entropy", pc.add(t["entropy"], 5.0)), "entropy outside"),
    (lambda t: t.slice(0, 0), "no rows"),
])
def test_damaged_profiles_are_refused(profile, tmp_path, fn, needle):
    bad = _mutate(profile, tmp_path / "bad", fn)
    with pytest.raises(FragError, match=needle):
        read_profile(bad)
    assert_one_line_error(run_cli("extract", bad, "--out", tmp_path / "f"), needle.split()[0])
    assert not (tmp_path / "f").exists()


def test_the_profile_as_written_is_accepted(profile):
    cols = read_profile(profile)
    assert len(cols["head"]) > 0 and (cols["energy_post"] >= 0).all()
