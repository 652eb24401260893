"""The event loop the daemon runs on: one failing callback must not end it."""

import os

import pytest

from pmlmd.node.loop import Loop


def test_a_failing_callback_is_reported_and_the_loop_goes_on():
    errors, calls = [], []
    loop = Loop(on_error=errors.append)
    bad_r, bad_w = os.pipe()
    good_r, good_w = os.pipe()
    try:
        def bad():
            os.read(bad_r, 1)
            raise RuntimeError("a malformed event")

        loop.watch(bad_r, bad)
        loop.watch(good_r, lambda: calls.append(os.read(good_r, 1)))
        os.write(bad_w, b"x")
        os.write(good_w, b"y")
        loop.poll(1.0)
        assert [str(e) for e in errors] == ["a malformed event"]
        assert calls == [b"y"]  # the other source was served in the same turn
    finally:
        for fd in (bad_r, bad_w, good_r, good_w):
            os.close(fd)


def test_without_an_error_handler_a_failing_callback_propagates():
    loop = Loop()
    r, w = os.pipe()
    try:
        loop.watch(r, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        os.write(w, b"x")
        with pytest.raises(RuntimeError, match="boom"):
            loop.poll(1.0)
    finally:
        os.close(r)
        os.close(w)
