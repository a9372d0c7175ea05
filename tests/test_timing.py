"""trainer.timing with fake candidates and timers: the order of the rounds, the sizing of repeats, the
sign test. No real timings are asserted."""
import pytest

from trainer import timing


def test_rotated_rounds_start_with_the_next_candidate_each_round():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    seconds = timing.interleaved_seconds(candidates, rounds=3, warmup=1, rotate=True)
    assert calls == list("ABC") + list("ABC" "BCA" "CAB")  # the warmup, then three rotated rounds
    assert {name: len(s) for name, s in seconds.items()} == {"A": 3, "B": 3, "C": 3}


def test_rounds_without_rotation_keep_the_order():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    timing.interleaved_seconds(candidates, rounds=2, warmup=0)
    assert calls == list("ABAB")


def test_no_rounds_is_an_error():
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleaved_seconds({"A": lambda: None}, rounds=0)


def test_repeats_lasting_grows_until_half_the_target_then_scales():
    asked = []

    def timed(n):  # a fake timer: 1 ms per repeat
        asked.append(n)
        return 1e-3 * n

    assert timing.repeats_lasting(timed, 0.2, most=10**6) == 200
    assert asked == sorted(asked) and asked[-1] * 1e-3 >= 0.1  # growing calls, the last lasting half of it
    assert timing.repeats_lasting(lambda n: 1e-3 * n, 0.2, most=50) == 50  # the cap


def test_resized_keeps_the_count_between_one_and_most():
    assert timing.resized(100, 0.5, 1.0, most=10**6) == 200
    assert timing.resized(100, 0.5, 1.0, most=150) == 150
    assert timing.resized(1, 10.0, 1.0, most=100) == 1
    assert timing.resized(10, 0.0, 1.0, most=100) == 100  # a call too short to time: the cap


def test_sign_test_p():
    assert timing.sign_test_p(5, 5) == pytest.approx(1 / 32)
    assert timing.sign_test_p(4, 5) == pytest.approx(6 / 32)
    assert timing.sign_test_p(0, 5) == 1.0
    assert timing.sign_test_p(8, 9) == pytest.approx(10 / 512)


def test_medians_and_rounds_won():
    seconds = {"A": [1.0, 3.0, 2.0], "B": [2.0, 2.5, 2.5]}
    assert timing.median_seconds(seconds) == {"A": 2.0, "B": 2.5}
    assert timing.rounds_won(seconds, "A", "B") == 2 and timing.fastest(seconds) == "A"
