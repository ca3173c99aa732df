from redlens_compile.models.shapes_task import GRID, QUESTION_TYPES, heldout_questions, sample, vocabulary


def test_samples_are_deterministic_and_splits_disjoint():
    a, seed_a = sample("train", 11, 6)
    b, seed_b = sample("train", 11, 6)
    assert a == b and seed_a == seed_b
    assert list(a.image(seed_a).getdata()) == list(b.image(seed_b).getdata())
    train_seeds = {sample("train", i)[1] for i in range(200)}
    test_seeds = {sample("test", i)[1] for i in range(200)}
    assert not train_seeds & test_seeds


def test_answers_follow_from_the_scene():
    for index in range(100):
        item, _ = sample("test", index, 5)
        for qa in item.qas:
            words = qa.question.split()
            if qa.qtype == "presence":
                colour, shape = words[3], words[4]
                assert qa.answer == ("yes" if any(o.colour == colour and o.shape == shape for o in item.objects) else "no")
            if qa.qtype == "colour":
                (obj,) = [o for o in item.objects if o.shape == words[4]]
                assert qa.answer == obj.colour
        assert all(0 <= o.row < GRID and 0 <= o.col < GRID for o in item.objects)


def test_heldout_set_is_balanced_and_in_vocabulary():
    items = heldout_questions(100)
    vocab = set(vocabulary())
    assert [qa.qtype for _, qa in items[:5]] == list(QUESTION_TYPES)
    for image, qa in items:
        assert image.size == (128, 128)
        assert qa.answer in vocab and set(qa.question.split()) <= vocab
