"""The translation task's numbers: what its module doc says of their digit counts."""

from __future__ import annotations

from collections import Counter

from attnlab.tasks.translation import _split_numbers


def _digits(numbers: list[int]) -> Counter[int]:
    return Counter(len(str(n)) for n in numbers if n >= 100)


def test_test_numbers_are_near_uniform_in_digits_and_training_runs_out_of_short_ones() -> None:
    """(The doc said training numbers had a uniform number of digits, "so small and large
    numbers are both common": at 60,000 + 1,000 training held 696 three-digit numbers and
    27,119 six-digit ones.)"""
    train, test = _split_numbers(20_000, 1000, 0)
    assert not set(train) & set(test) and set(range(100)) <= set(train)
    assert all(200 <= c <= 300 for c in _digits(test).values())  # 250 each when uniform
    seen = _digits(train)
    assert seen[3] + _digits(test)[3] == 900  # every 3-digit number is taken
    assert seen[3] < 1000 < 4000 < seen[5] < seen[6]  # a uniform draw gives 4975 each
    assert seen[5] + seen[6] > 0.6 * sum(seen.values())
