"""Session and transaction ids."""

import os

from gateway.session import _next_id


def test_ids_start_with_the_pid_of_the_process_that_made_them() -> None:
    assert _next_id().split(".")[0] == str(os.getpid())
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker, forked after the import
        try:
            os.write(write, _next_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read().decode().split(".")[0] == str(child)
