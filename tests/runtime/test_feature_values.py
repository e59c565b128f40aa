"""The feature-value rules (mvke/runtime/feature_values.py): the Python and the Arrow form agree."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mvke.runtime.feature_values import column_problems, first_problems, value_problem

VALUES = [("cat", "a"), ("cat", 3), ("cat", 2.5), ("cat", True), ("cat", None), ("cat", ["a"]), ("cat", {"k": 1}),
          ("multi", ["a", "b"]), ("multi", [1, 2]), ("multi", []), ("multi", None), ("multi", "a|b"),
          ("multi", 4), ("multi", [["x"]]), ("multi", ["a|b"]), ("multi", {"k": "v"})]


@pytest.mark.parametrize("kind,value", VALUES, ids=[f"{k}-{v!r}" for k, v in VALUES])
def test_one_value_and_its_arrow_column_read_the_same(kind, value):
    col = pa.array([value, None])
    problems = column_problems(kind, col)
    by_column = next((why for rows, why in problems if rows[0]), None)
    assert by_column == value_problem(kind, value)
    assert not any(rows[1] for rows, _ in problems)          # a missing value is never a problem


def test_stored_form_is_accepted_only_where_asked():
    assert value_problem("multi", "a|b") == "expected a list of values, got str"
    assert value_problem("multi", "a|b", stored_ok=True) is None
    assert value_problem("multi", ["a|b"]) is not None and value_problem("multi", ["a|b"], stored_ok=True) is None
    assert value_problem("multi", float("nan")) is None and value_problem("cat", np.array(["a"])) is not None


def test_first_problems_names_the_first_bad_field_in_schema_order():
    table = pa.table({"a": pa.array([["x"], None, None]), "b": pa.array(["s", None, "t"])})
    got = first_problems(table, {"a": "cat", "b": "multi", "absent": "cat"})
    assert got == {0: ("a", "expected one value, got list"), 2: ("b", "expected a list of values, got str")}
