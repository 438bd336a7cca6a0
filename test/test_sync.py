"""The node's and the bag tool's synchronizers (no ROS needed)."""
from __future__ import annotations

import pytest

from matchanything_ros.core.errors import ConfigError
from matchanything_ros.core.params import defaults
from matchanything_ros.ros.sync import (
    ApproximateTimeSync,
    ExactTimeSync,
    SequentialPairer,
    StampOrderError,
    make_synchronizer,
)

MS = 1_000_000  # ns


def stamps(pairs):
    return [(p.stamp0, p.stamp1) for p in pairs]


def feed(sync, events):
    """events: (input index, stamp in ms); returns all emitted pairs as (stamp0, stamp1) in ms."""
    out = []
    for index, t_ms in events:
        out += [(p.stamp0 // MS, p.stamp1 // MS) for p in sync.add(index, t_ms * MS, f"{index}@{t_ms}")]
    return out


def test_exact_pairs_equal_stamps_whichever_input_comes_first():
    sync = ExactTimeSync(queue_size=5)
    assert feed(sync, [(0, 100), (1, 100), (1, 200), (0, 200)]) == [(100, 100), (200, 200)]
    assert sync.stats.pairs == 2 and sync.stats.sync_failures == 0


def test_exact_pair_carries_the_messages():
    sync = ExactTimeSync(queue_size=5)
    sync.add(0, 5, "left")
    (pair,) = sync.add(1, 5, "right")
    assert (pair.msg0, pair.msg1) == ("left", "right")


def test_exact_rejects_skew_and_counts_failures():
    sync = ExactTimeSync(queue_size=3)
    assert feed(sync, [(0, 100), (1, 101), (0, 200), (1, 201), (0, 300), (1, 301), (0, 400), (1, 401)]) == []
    # queues hold at most 3: the oldest message of each input fell out without a partner
    assert sync.stats.sync_failures == 2
    assert sync.pending() == (3, 3)


def test_exact_drops_older_unpaired_messages_when_a_newer_pair_completes():
    sync = ExactTimeSync(queue_size=5)
    assert feed(sync, [(0, 100), (0, 200), (1, 200)]) == [(200, 200)]
    assert sync.stats.sync_failures == 1  # image0 at 100 never got a partner
    assert sync.pending() == (0, 0)


def test_approximate_pairs_within_tolerance_and_rejects_beyond():
    sync = ApproximateTimeSync(queue_size=5, tolerance_s=0.010)
    # 100/104: 4 ms skew -> paired; 200/230: 30 ms > 10 ms -> refused; 300/297 -> paired
    pairs = feed(sync, [(0, 100), (1, 104), (0, 200), (1, 230), (0, 300), (1, 297), (0, 400)])
    assert pairs == [(100, 104), (300, 297)]
    assert sync.stats.sync_failures >= 2  # 200 and 230 found no partner


def test_approximate_picks_the_nearest_partner_not_the_first():
    sync = ApproximateTimeSync(queue_size=10)
    # image1 at 108 is nearer to image0 at 110 than to image0 at 100
    pairs = feed(sync, [(0, 100), (1, 108), (0, 110), (1, 120), (0, 130)])
    assert pairs[0] == (110, 108)
    assert (100, 108) not in pairs


def test_approximate_emits_without_waiting_once_the_frame_period_is_known():
    sync = ApproximateTimeSync(queue_size=10)
    feed(sync, [(0, 0), (1, 2), (0, 100), (1, 102)])  # learns the 100 ms period
    # 200/202: the next image0 cannot come before 300, so 202's partner is certainly 200
    assert feed(sync, [(0, 200), (1, 202)]) == [(200, 202)]


def test_approximate_waits_when_a_nearer_partner_may_still_come():
    sync = ApproximateTimeSync(queue_size=10)
    assert feed(sync, [(0, 100), (1, 150)]) == []  # a later image0 might be nearer to 150
    assert feed(sync, [(0, 160)]) == []  # 100 has no partner now; a later image1 might be nearer to 160
    assert sync.stats.sync_failures == 1  # image0 at 100
    assert feed(sync, [(1, 250)]) == [(160, 150)]


def test_exact_stamps_pair_immediately_in_approximate_mode():
    sync = ApproximateTimeSync(queue_size=5, tolerance_s=0.01)
    assert feed(sync, [(0, 100), (1, 100)]) == [(100, 100)]


def test_sequential_pairs_each_frame_with_the_previous_one():
    sync = SequentialPairer()
    pairs = feed(sync, [(0, 100), (0, 200), (0, 300)])
    assert pairs == [(200, 100), (300, 200)]  # image0 = current frame, image1 = previous


@pytest.mark.parametrize("sync", [ExactTimeSync(5), ApproximateTimeSync(5, 0.1), SequentialPairer()],
                         ids=["exact", "approximate", "sequential"])
def test_duplicate_and_out_of_order_stamps_are_rejected_with_a_reason(sync):
    sync.add(0, 200 * MS, "a")
    with pytest.raises(StampOrderError, match="duplicate stamp"):
        sync.add(0, 200 * MS, "b")
    with pytest.raises(StampOrderError, match="older than the previous"):
        sync.add(0, 100 * MS, "c")
    assert sync.stats.rejected_stamps == 2
    # the stream continues normally afterwards
    sync.add(0, 300 * MS, "d")


def test_reset_accepts_older_stamps_again():
    sync = ExactTimeSync(5)
    feed(sync, [(0, 500), (1, 500)])
    sync.reset()
    assert feed(sync, [(0, 100), (1, 100)]) == [(100, 100)]


def test_make_synchronizer_follows_the_node_parameters():
    params = defaults()
    assert isinstance(make_synchronizer(params), ExactTimeSync)
    assert isinstance(make_synchronizer({**params, "approximate_sync": True}), ApproximateTimeSync)
    assert isinstance(make_synchronizer({**params, "mode": "sequential"}), SequentialPairer)
    with pytest.raises(ConfigError):
        ExactTimeSync(0)
