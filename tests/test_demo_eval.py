"""The demo's judge (`bench.demo_eval`) on the synthetic world's own renders, where the answer is known."""

import numpy as np

from bench import demo_eval, demo_world


def test_judge_reads_rendered_scenes_exactly():
    accuracy = demo_eval.judge_accuracy(count=24, seed=3)
    assert accuracy == {"background": 1.0, "color": 1.0, "shape": 1.0, "shape, any aspect": 1.0}


def test_centred_scenes_stay_near_the_centre_and_scale_with_the_image():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = demo_world.random_scene(rng, demo_world.all_combinations(), image_size=128, centred=True)
        assert abs(scene.cx - 64) <= 4 and abs(scene.cy - 64) <= 4 and 44 <= scene.size <= 80


def test_a_square_drawn_as_a_rectangle_is_a_square_for_the_any_aspect_verdict():
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[...] = demo_world.COLORS["blue"]
    image[40:88, 30:98] = demo_world.COLORS["red"]  # 48 x 68: no square template fits it well
    verdict = demo_eval.judge(image)
    assert (verdict.background, verdict.color, verdict.shape_any_aspect) == ("blue", "red", "square")


def test_a_speck_away_from_the_object_does_not_change_its_shape():
    """An autoencoder's stray pixel in a corner once stretched the object's bounding box across the picture, and
    well-drawn squares were judged circles."""
    image = np.zeros((128, 128, 3), dtype=np.uint8)
    image[...] = demo_world.COLORS["red"]
    image[35:93, 33:91] = demo_world.COLORS["yellow"]
    image[127, 0] = image[126, 1] = demo_world.COLORS["orange"]
    verdict = demo_eval.judge(image)
    assert (verdict.background, verdict.color, verdict.shape, verdict.shape_any_aspect) == ("red", "yellow", "square",
                                                                                              "square")
    assert verdict.stray_pixels == 2
