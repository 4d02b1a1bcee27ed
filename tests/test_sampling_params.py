import math

import pytest

from opt_fast import SamplingParams

BAD = [
    ("n", 0), ("n", 1.5), ("n", True), ("n", 1025), ("n", 2 ** 63 - 1),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -2), ("top_k", 2.0),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan), ("top_p", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf), ("temperature", 1e39), ("repetition_penalty", 1e-39),
    ("repetition_penalty", 1e-46), ("repetition_penalty", 1e39),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", None),
    ("min_tokens", -1), ("seed", 1.5), ("seed", -5), ("seed", 2 ** 63), ("seed", True),
    ("logprobs", -1), ("prompt_logprobs", -1),
    ("stop", [""]), ("stop", [3]), ("stop", 5), ("stop_token_ids", [-1]), ("stop_token_ids", 5),
    ("stop_token_ids", [2.0]), ("ignore_eos", 1),
    ("banned_token_ids", [-1]), ("banned_token_ids", 5), ("banned_token_ids", [2.0]),
    ("penalty_on_logprobs", 1), ("skip_special_tokens", "yes"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(top_p=1.0), dict(top_p=1e-9),
                                    dict(top_k=-1), dict(top_k=0), dict(repetition_penalty=0.5),
                                    dict(max_tokens=1), dict(seed=0), dict(seed=2 ** 63 - 1), dict(stop="x"),
                                    dict(logprobs=0)])
def test_edge_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        # kept as given (a lone stop string becomes a list of one)
        assert getattr(params, name) == ([value] if name == "stop" else value), name
    assert isinstance(params.stop, list)


def test_stop_strings_from_an_iterator_or_an_array_are_kept():
    """Read once into a list: a generator is not used up by the check, an array not asked for
    its truth value; the strings come back as Python strs."""
    np = pytest.importorskip("numpy")
    assert SamplingParams(stop=(s for s in ["abc", "d"])).stop == ["abc", "d"]
    assert SamplingParams(stop=iter(["x"])).stop == ["x"]
    stop = SamplingParams(stop=np.array(["a", "bc"])).stop
    assert stop == ["a", "bc"] and all(type(s) is str for s in stop)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=(s for s in ["ok", ""]))


def test_numpy_integers_are_taken_as_python_ints():
    np = pytest.importorskip("numpy")
    params = SamplingParams(n=np.int64(2), max_tokens=np.int32(7), seed=np.uint64(3), logprobs=np.int16(1),
                            stop_token_ids=[np.int64(5)], stop=("a", "b"))
    values = (params.n, params.max_tokens, params.seed, params.logprobs, *params.stop_token_ids)
    assert values == (2, 7, 3, 1, 5) and all(type(v) is int for v in values)
    assert params.stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=np.array([3, 4]), stop={"x"}).stop_token_ids == [3, 4]
