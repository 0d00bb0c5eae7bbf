"""study.ladder: the round-2 peaks it counts, by hand, and its one-line errors."""
import numpy as np
import pytest

from minimal_amkp.study.ladder import main, rim_share, round2_maps


def test_round2_peaks_on_the_rim_by_hand():
    """Image 0 class 1: M_1 erases the centre cell of a 5×5 map. The learnt H_2 peaks next to
    it (rim), the frozen H_1 ⊙ M_1 in the corner. Image 0 class 2 is unlabelled and image 1's
    map is erased whole: neither counts."""
    cams = np.zeros((2, 2, 8, 5, 5))
    masks = np.ones((2, 2, 8, 5, 5))
    labels = np.zeros((2, 14))
    labels[0, 1] = labels[1, 1] = 1
    masks[1, 0, 1, 2, 2] = 0
    masks[1, 0, 2, 2, 2] = 0
    masks[1, 1, 1] = 0
    cams[0, 0, 1, 2, 2], cams[0, 0, 1, 0, 0] = 9.0, 1.0          # H_1: the centre, then the corner
    cams[1, 0, 1, 2, 3] = 5.0                                    # H_2: beside the erased centre
    maps = round2_maps(cams, masks, labels)
    assert list(maps) == [(0, 1)]
    assert np.isneginf(maps[(0, 1)][1][2, 2]), "an erased cell kept its value"
    np.testing.assert_array_equal(rim_share(maps, masks), [1.0, 0.0])


def test_bad_command_lines_get_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^usage: python -m minimal_amkp.study.ladder RUN"):
        main([])
    with pytest.raises(SystemExit, match=rf"^ladder: {tmp_path}: no report.json \(not a finished run\)$"):
        main([str(tmp_path)])
