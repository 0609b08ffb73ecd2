"""Built-in tasks, the JSONL loader, the reward functions and the checks on what they return."""

import json
import math
import re

import numpy as np
import pytest
import torch

from bv_blend import rewards, tasks
from bv_blend.rewards import RewardFunctionError, WeightedRewards


@pytest.mark.parametrize("name", ["add", "add_sparse", "reverse", "reverse_sparse"])
def test_procedural_tasks_are_deterministic_per_position(name):
    task = tasks.get_task(name)
    a = tasks.prompt_source(task, seed=1)
    b = tasks.prompt_source(task, seed=1)
    other = tasks.prompt_source(task, seed=2)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] != [other[i] for i in range(50)]
    assert a[37] == b[37]  # random access: no need to walk the stream


def test_addition_answers_are_right():
    source = tasks.prompt_source(tasks.get_task("add"), seed=0)
    for i in range(200):
        ex = source[i]
        a, b = map(int, re.fullmatch(r"(\d)\+(\d)=", ex["prompt"]).groups())
        assert ex["answer"] == f"{a + b:02d}"


def test_reversal_answers_are_right():
    source = tasks.prompt_source(tasks.get_task("reverse"), seed=0)
    for i in range(100):
        ex = source[i]
        digits = re.fullmatch(r"rev (\d{3}):", ex["prompt"]).group(1)
        assert ex["answer"] == digits[::-1]


def test_task_answers_fit_the_completion_length():
    for name, task in tasks.TASKS.items():
        if task.make_example is None:
            continue
        source = tasks.prompt_source(task, seed=0)
        longest = max(len(source[i]["answer"]) for i in range(200))
        assert longest + 1 <= task.max_completion_length, name  # + 1 for the EOS


def test_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.get_task("chess")


def test_partial_credit_by_hand():
    score = lambda c, a: rewards.digit_partial_credit([""], [c], answer=[a])[0]  # noqa: E731
    assert score("08", "08") == 1.0
    assert score(" 08\n", "08") == 1.0
    assert score("07", "08") == pytest.approx((1 + 0.5 * (1 - 1 / 9)) / 2)
    assert score("0", "08") == pytest.approx(1 / 2)  # a missing character earns nothing
    assert score("08x", "08") == pytest.approx(2 / 3)  # trailing junk costs a character
    assert score("ab", "08") == 0.0
    assert score("", "08") == 0.0


def test_partial_credit_is_nonzero_for_random_text():
    gen = torch.Generator().manual_seed(0)
    alphabet = [chr(c) for c in range(32, 127)]
    texts = ["".join(alphabet[i] for i in torch.randint(0, len(alphabet), (3,), generator=gen))
             for _ in range(400)]
    scores = rewards.digit_partial_credit([""] * 400, texts, answer=["08"] * 400)
    assert 0 < sum(scores) / 400 < 0.2


def test_exact_match_is_sparse():
    assert rewards.exact_match(["p"] * 3, ["08", " 08 ", "07"], answer=["08"] * 3) == [1, 1, 0]


def test_jsonl_loader_and_epoch_shuffle(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"prompt": f"q{i}", "answer": str(i), "extra": i} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = tasks.load_jsonl(str(path))
    source = tasks.prompt_source(tasks.get_task("jsonl"), seed=3, dataset=dataset)
    first, second = [source[i] for i in range(7)], [source[i] for i in range(7, 14)]
    # Each epoch visits every record once, in its own seeded order.
    assert sorted(r["prompt"] for r in first) == sorted(r["prompt"] for r in records)
    assert sorted(r["prompt"] for r in second) == sorted(r["prompt"] for r in records)
    assert [r["prompt"] for r in first] != [r["prompt"] for r in second]
    again = tasks.prompt_source(tasks.get_task("jsonl"), seed=3, dataset=dataset)
    assert [again[i] for i in range(14)] == first + second


def test_jsonl_loader_names_missing_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]"):
        tasks.load_jsonl(str(path))


def test_procedural_prompts_need_a_generator_for_jsonl():
    with pytest.raises(ValueError, match="dataset_path"):
        tasks.prompt_source(tasks.get_task("jsonl"), seed=0)


# WeightedRewards ------------------------------------------------------------------------------

def constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)
    reward.__name__ = f"constant_{value}"
    return reward


def test_weighted_sum_and_unscored_entries():
    def partly(prompts, completions, **kwargs):
        return [None, 1.0, None]

    def never(prompts, completions, **kwargs):
        return [None, None, None]

    rewards = WeightedRewards([constant(1.0), partly, never], weights=[0.5, 2.0, 3.0])
    total, per_func = rewards(["a", "b", "c"], ["x", "y", "z"], {})
    torch.testing.assert_close(total, torch.tensor([0.5, 2.5, 0.5]))
    assert per_func.shape == (3, 3) and math.isnan(per_func[0, 1]) and per_func[1, 1] == 1.0

    only_none, _ = WeightedRewards([never])(["a", "b", "c"], ["x", "y", "z"], {})
    assert only_none.isnan().all()


def test_dataset_columns_are_passed_by_keyword():
    seen = {}

    def spy(prompts, completions, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, level=level)
        return [0.0] * len(prompts)

    WeightedRewards([spy])(["p1", "p2"], ["c1", "c2"], {"answer": ["a1", "a2"], "level": [1, 2]})
    assert seen == {"prompts": ["p1", "p2"], "completions": ["c1", "c2"],
                    "answer": ["a1", "a2"], "level": [1, 2]}


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"'bad' returned 1 values for 2 completions"),
    ([1.0, "high"], r"'bad' returned 'high' \(str\) at index 1"),
    ([True, 0.0], r"'bad' returned True \(bool\) at index 0"),
    (3.0, r"'bad' returned float, expected a list"),
    ({0.5: "p1", 1.0: "p2"}, r"'bad' returned dict, expected a list"),
    ("01", r"'bad' returned str, expected a list"),
    ({0.0, 1.0}, r"'bad' returned set, expected a list"),
    ((x for x in [0.0, 1.0]), r"'bad' returned generator, expected a list"),
    (np.zeros((2, 1)), r"'bad' returned ndarray of shape \(2, 1\), expected a 1-D one"),
    (np.zeros(3), r"'bad' returned 3 values for 2 completions"),
    (torch.zeros(1, 2), r"'bad' returned Tensor of shape \(1, 2\), expected a 1-D one"),
    ([1.0, math.inf], r"'bad' returned inf at index 1; scores must be finite"),
    ([-math.inf, 0.0], r"'bad' returned -inf at index 0; scores must be finite"),
    (torch.tensor([0.0, -math.inf]), r"'bad' returned -inf at index 1; scores must be finite"),
])
def test_malformed_reward_output_is_named(returned, message):
    def bad(prompts, completions, **kwargs):
        return returned

    with pytest.raises(RewardFunctionError, match=message):
        WeightedRewards([bad])(["p1", "p2"], ["c1", "c2"], {})


@pytest.mark.parametrize("returned", [
    (0.5, None), np.array([0.5, np.nan]), torch.tensor([0.5, math.nan]),
    [np.float32(0.5), torch.tensor(math.nan)],
])
def test_sequences_of_scores_are_accepted(returned):
    def scores(prompts, completions, **kwargs):
        return returned

    total, _ = WeightedRewards([scores])(["p1", "p2"], ["c1", "c2"], {})
    assert total[0] == 0.5 and total[1].isnan()


def test_raising_reward_function_names_the_prompt():
    def picky(prompts, completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    with pytest.raises(RewardFunctionError,
                       match=r"'picky' raised ZeroDivisionError.*prompt '2\+2='"):
        WeightedRewards([picky])(["1+1=", "2+2=", "3+3="], ["02", "", "06"], {})


def test_reward_weights_must_match():
    with pytest.raises(ValueError, match="reward_weights has 1 entries for 2"):
        WeightedRewards([constant(1.0), constant(2.0)], weights=[1.0])
    with pytest.raises(TypeError, match="not callable"):
        WeightedRewards(["exact_match"])
