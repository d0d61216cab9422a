from __future__ import annotations

from collections.abc import Iterator

import pytest
from stack import Stack


@pytest.fixture
def stack() -> Iterator[Stack]:
    """A broker (started) in its own runtime dir; add workers with stack.start_worker()."""
    s = Stack()
    try:
        s.start_broker()
        yield s
    finally:
        s.stop()


@pytest.fixture
def bare_stack() -> Iterator[Stack]:
    """Nothing started: the test starts what it needs."""
    s = Stack()
    try:
        yield s
    finally:
        s.stop()
