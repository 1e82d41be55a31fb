"""Faults injected at the operating-system boundary into a real entry point (mnist.py, the promote step's program),
for the tests of tests/test_promotion_faults.py. Python imports this module at start when its folder is on
PYTHONPATH; the environment variable PROMOTE_FAULT chooses the fault:

    interrupt_while_copying   Ctrl-C (SIGINT) as soon as a folder is made inside a .tmp-* staging folder
    interrupt_after_rename    Ctrl-C right after a folder is renamed to an integer name (a version lands)
    disk_full_after_bytes=N   os.sendfile (how shutil copies on Linux) fails with ENOSPC once N bytes were copied

PROMOTE_SIGNAL=TERM sends SIGTERM (a pod being stopped) instead of SIGINT for the two interrupts. PROMOTE_HOSTNAME, if set, is the host name socket.gethostname() returns: the process acts as a pod on another
host that mounts the same volume, whose processes this host cannot see.

    PYTHONPATH=tests/faults PROMOTE_FAULT=interrupt_after_rename python3 mnist_model/mnist.py ...
"""
import errno
import os
import signal
import socket

FAULT = os.environ.get('PROMOTE_FAULT', '')
if os.environ.get('PROMOTE_HOSTNAME'):
    socket.gethostname = lambda: os.environ['PROMOTE_HOSTNAME']


def interrupt():
    os.kill(os.getpid(), signal.SIGTERM if os.environ.get('PROMOTE_SIGNAL') == 'TERM' else signal.SIGINT)


if FAULT == 'interrupt_while_copying':
    real_makedirs = os.makedirs

    def makedirs(name, *args, **kwargs):
        real_makedirs(name, *args, **kwargs)
        if os.path.basename(os.path.dirname(os.fspath(name))).startswith('.tmp-'):
            interrupt()

    os.makedirs = makedirs
elif FAULT == 'interrupt_after_rename':
    real_rename = os.rename

    def rename(source, destination, *args, **kwargs):
        real_rename(source, destination, *args, **kwargs)
        if os.path.basename(os.fspath(destination)).isdigit():
            interrupt()

    os.rename = rename
elif FAULT.startswith('disk_full_after_bytes='):
    room = [int(FAULT.split('=', 1)[1])]
    real_sendfile = os.sendfile

    def sendfile(out_fd, in_fd, offset, count):
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sent = real_sendfile(out_fd, in_fd, offset, min(count, room[0]))
        room[0] -= sent
        return sent

    os.sendfile = sendfile
