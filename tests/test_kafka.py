"""The publisher's partition choice: the producer's default partitioner's, key for key."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from service.kafka import partition_for


@given(key=st.binary(max_size=200), count=st.integers(min_value=1, max_value=64))
def test_partition_is_the_default_partitioners(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


def test_invoices_spread_over_every_partition() -> None:
    partitions = [0, 1, 2, 3]
    keys = [f"bitfinex:inv-{i}".encode() for i in range(64)]
    assert {partition_for(k, partitions) for k in keys} == set(partitions)
