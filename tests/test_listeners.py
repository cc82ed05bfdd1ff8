"""The listener scan behind the loopback-only check of local runs (tests/e2e/test_demo_e2e.py) sees what it must."""

from __future__ import annotations

import socket

import psutil

from tests._listeners import is_loopback, listeners


def test_the_loopback_check_recognises_loopback_forms() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::ffff:127.0.0.1") and is_loopback("::1")
    assert not is_loopback("::") and not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2")


def test_the_listener_scan_sees_a_socket_of_this_process() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = [ip for _, ip, p in listeners(psutil.Process()) if p == port]
        assert found == ["0.0.0.0"] and not is_loopback(found[0])  # an exposed socket is seen as exposed
