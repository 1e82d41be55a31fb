"""The model server's HTTP/1.1 layer: uvicorn with httptools, with the limits a server open to any client needs.

uvicorn (an ASGI server) with the httptools parser (llhttp, Node.js's parser) is what KServe's Python model server
runs on. llhttp is strict: a request line that is not HTTP, duplicate or non-numeric `Content-Length` headers, a
`Content-Length` beside a `Transfer-Encoding`, a transfer coding other than chunked last, control or non-ASCII bytes
in the target are all refused with 400 before the application sees them, and the connection is closed, so no two
parts of a chain can read one request differently (request smuggling). Request bodies are framed by the parser, so a
body the application does not read (a GET with a body) is dropped and the next request on the connection is read
right. `ModelServerProtocol` adds what uvicorn leaves out, each with a clean HTTP reply and a JSON body:

- at most `max_connections` connections at a time, counted from their accept() to their close, so that lingering
  ones count too: one over that gets 503 right at accept(), before asyncio makes a transport for it, and is closed
  (`GuardedSocket`). So the server never runs out of descriptors (model_server.py lowers the cap below the
  descriptor limit): at EMFILE asyncio stops accepting for a second at a time, and new clients would wait in the
  listen queue instead of being answered;
- a total time for a request's head (`header_timeout_seconds`, against clients that send a byte now and then), and
  at most MAX_HEADER_BYTES of it: 408 or 431;
- a time without progress while a body arrives (`body_timeout_seconds`), and a total time for the whole body
  (`body_deadline_seconds`, against clients that send a byte now and then): 408;
- back-pressure on pipelined requests: while a connection's finished but unsent replies are over MAX_UNSENT_BYTES
  (the client does not read them), or requests it pipelined wait for their turn, the connection is not read; it is
  read again once the client has read its replies. A connection whose replies stay unread for
  `body_timeout_seconds` is closed. So a client that never reads costs at most one read's worth of queued requests
  and MAX_UNSENT_BYTES of replies;
- a client that ends its side of the connection in the middle of a body gets 400 (the application sees
  scope[TRUNCATED] set), and one that ends it after a whole request still gets its answer;
- when the server closes a connection on which the client may still be sending (a 413 before the body was read), it
  first ends its own side and reads and drops what still arrives, for at most LINGER_SECONDS, so the client reads
  the reply instead of a connection reset.

`serve_app` runs the application until SIGINT or SIGTERM, then stops accepting, lets the requests in flight finish
for at most `shutdown_grace_seconds` and returns (the caller exits 0). Listen sockets come from `listen`, which
asks for a backlog of BACKLOG connections.

Example:
    sock = listen('127.0.0.1', 8501)          # raises OSError: port taken
    serve_app(app, sock, HttpLimits())        # returns after SIGINT or SIGTERM
"""

import contextlib
import email.utils
import json
import logging
import signal
import socket
import typing

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving_log import log_line

# The listen backlog: clients that connect at the same instant wait in the kernel's queue, not for a SYN retry.
# (Linux caps it at net.core.somaxconn, 4096 by default.)
BACKLOG = 2048
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
LINGER_SECONDS = 5
LINGER_IDLE_SECONDS = 1
# Reads of what a client refused at accept() already sent, before its connection is closed (see refuse_at_accept).
REFUSAL_DRAIN_READS = 16
# A connection is not read while more reply bytes than this wait to be sent on it (the client does not read them).
# Larger than the largest usual reply (a 100-image predict answers about 14 KB), so a client that reads its replies
# never waits for this.
MAX_UNSENT_BYTES = 64 * 1024
SERVER_NAME = 'mnist-model-server'
# Set in an HTTP scope when the client ended its side of the connection before the end of the request's body.
TRUNCATED = 'mnist_model.truncated'
# Set in every HTTP scope: the set of requests in flight (asyncio tasks), so the application can tell a lone one.
IN_FLIGHT = 'mnist_model.in_flight'
# The reason phrases of the statuses this layer answers on its own.
REASONS = {400: 'Bad Request', 408: 'Request Timeout', 431: 'Request Header Fields Too Large',
           503: 'Service Unavailable'}


class HttpLimits(typing.NamedTuple):
    """The limits of the HTTP layer (their flags are in model_server.py)."""
    max_connections: int = 1024
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    body_deadline_seconds: float = 60.0
    keep_alive_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0


class HeadTooLarge(Exception):
    """Raised from a parser callback when a request's head is over MAX_HEADER_BYTES or MAX_HEADERS."""


def printable(text, limit=200):
    """Text for a log line: at most `limit` characters, control and non-ASCII characters escaped (\\x1b)."""
    text = text[:limit]
    if text.isascii() and text.isprintable():
        return text
    return ''.join(char if ' ' <= char <= '~' else char.encode('unicode_escape').decode('ascii')
                   if char.isascii() else char.encode('ascii', 'backslashreplace').decode('ascii') for char in text)


def error_response(status, message):
    """A whole HTTP/1.1 reply with the body {"error": message} that closes the connection."""
    body = json.dumps({'error': message}).encode('utf-8')
    head = (f'HTTP/1.1 {status} {REASONS.get(status, "")}\r\nServer: {SERVER_NAME}\r\n'
            f'Date: {email.utils.formatdate(usegmt=True)}\r\nContent-Type: application/json\r\n'
            f'Content-Length: {len(body)}\r\nConnection: close\r\n\r\n')
    return head.encode('latin-1') + body


class GatedFlowControl(FlowControl):
    """uvicorn's flow control, whose resume_reading (which uvicorn calls whenever a request wants more of its body,
    and after every reply) resumes only when the protocol allows it: not while requests pipelined on the connection
    wait for their turn, nor while its unsent replies are over MAX_UNSENT_BYTES. Without this, every reply
    resumed reading, and a client that pipelined requests without reading the replies made the server queue them
    without end (80 000 one-row predicts: +393 MB)."""

    def __init__(self, transport, protocol):
        super().__init__(transport)
        self.protocol = protocol

    def resume_reading(self):
        if self.protocol.may_read():
            super().resume_reading()


class GuardedSocket(socket.socket):
    """The listening socket, whose accept() refuses connections over `max_connections` itself: asyncio accepts up to
    BACKLOG connections in one go before any protocol sees them, so a cap checked in connection_made came too late
    to keep the descriptors free. `open_connections` counts the connections accepted and not yet lost (the protocol
    decrements it); `on_refused` is called with the client address of each one refused."""

    max_connections = 1024
    open_connections = 0
    on_refused = None

    def accept(self):
        while True:
            connection, address = super().accept()  # BlockingIOError once no connection waits: asyncio stops
            if self.open_connections < self.max_connections:
                self.open_connections += 1
                return connection, address
            refuse_at_accept(connection, error_response(
                503, f'the server has its limit of {self.max_connections} connections open (--max_connections): '
                     'try again later'))
            if self.on_refused is not None:
                self.on_refused(address, 503)


def refuse_at_accept(connection, reply):
    """Send a refusal on a just-accepted connection and close it. What the client already sent is read first (a
    few reads, without waiting), so that the close ends the connection in order and the client reads the reply
    rather than a reset."""
    try:
        connection.setblocking(False)
        connection.send(reply)  # a fresh connection's send buffer holds it
        connection.shutdown(socket.SHUT_WR)
        for _ in range(REFUSAL_DRAIN_READS):
            if not connection.recv(65536):
                break
    except OSError:  # BlockingIOError: nothing more to read now; or the client has gone
        pass
    finally:
        connection.close()


class LingeringTransport:
    """The transport as uvicorn's request cycle sees it: close() goes through the protocol, which lingers when the
    client may still be sending. Everything else is the real transport's."""

    def __init__(self, transport, protocol):
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write
        self.is_closing = transport.is_closing

    def close(self):
        self._protocol.close_connection()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class ModelServerProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring. `limits` and `on_bad_request` (a
    function of (client address, status), called for each request refused here) are set by serve_app."""

    limits = HttpLimits()
    on_bad_request = None
    listener = None  # the GuardedSocket, whose count of open connections connection_lost lowers

    def connection_made(self, transport):
        super().connection_made(transport)
        self.real_transport = transport
        self.transport = LingeringTransport(transport, self)
        # The transport calls pause_writing above MAX_UNSENT_BYTES, and resume_writing once under a quarter of it.
        transport.set_write_buffer_limits(high=MAX_UNSENT_BYTES)
        self.flow = GatedFlowControl(transport, self)
        self.send_timer = None
        self.lingering = False
        self.linger_timer = None
        self.linger_deadline = 0.0
        self.head_done = True          # no request begun yet
        self.message_done = True
        self.head_bytes = 0            # bytes received since the request began, while its head is incomplete
        self.field_bytes = 0           # bytes of the target and header lines the parser handed over
        self.field_count = 0
        self.request_bytes_seen = False
        self.timer = None
        self.body_deadline = 0.0
        # The time to the first request counts as header time, so a client that connects and sends nothing is
        # closed as well.
        self.set_timer(self.limits.header_timeout_seconds, self.head_timed_out)

    # Timers: one per connection, for the request's head, then for its body.

    def set_timer(self, seconds, callback):
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, callback) if seconds > 0 else None

    def clear_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def head_timed_out(self):
        self.timer = None
        if self.lingering or self.real_transport.is_closing():
            return
        if self.request_bytes_seen:
            self.refuse(408, f'the request head did not arrive within {self.limits.header_timeout_seconds:g} s '
                             '(--header_timeout_seconds)')
        else:
            self.real_transport.close()

    def set_body_timer(self):
        """The body's timer: body_timeout_seconds from now, but never past the body's deadline."""
        remaining = self.body_deadline - self.loop.time()
        self.set_timer(max(0.0, min(self.limits.body_timeout_seconds, remaining)), self.body_timed_out)

    def body_timed_out(self):
        self.timer = None
        cycle = self.cycle
        if self.lingering or self.real_transport.is_closing() or cycle is None or cycle.response_started:
            return
        # The application's receive() now returns http.disconnect, and its reply would go nowhere.
        cycle.disconnected = True
        cycle.message_event.set()
        if self.loop.time() >= self.body_deadline - 0.001:
            self.refuse(408, f'the request body did not arrive within {self.limits.body_deadline_seconds:g} s '
                             '(--body_deadline_seconds)')
        else:
            self.refuse(408, f'no part of the request body arrived for {self.limits.body_timeout_seconds:g} s')

    # Parser callbacks: uvicorn's, plus the bounds on the head and the timers.

    def on_message_begin(self):
        super().on_message_begin()
        self.head_done = self.message_done = False
        self.head_bytes = self.field_bytes = self.field_count = 0
        self.request_bytes_seen = True
        self.set_timer(self.limits.header_timeout_seconds, self.head_timed_out)

    def on_url(self, url):
        self.field_bytes += len(url)
        if self.field_bytes > MAX_HEADER_BYTES:
            raise HeadTooLarge
        super().on_url(url)

    def on_header(self, name, value):
        self.field_bytes += len(name) + len(value)
        self.field_count += 1
        if self.field_bytes > MAX_HEADER_BYTES or self.field_count > MAX_HEADERS:
            raise HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self):
        self.head_done = True
        self.body_deadline = self.loop.time() + self.limits.body_deadline_seconds
        self.set_body_timer()
        self.scope[IN_FLIGHT] = self.tasks
        super().on_headers_complete()

    def on_body(self, body):
        if self.timer is not None:
            self.set_body_timer()
        super().on_body(body)

    def on_message_complete(self):
        self.message_done = True
        self.clear_timer()
        super().on_message_complete()

    def on_response_complete(self):
        super().on_response_complete()
        # uvicorn armed its keep-alive timer; the head timer starts with the next request's first byte (unless a
        # pipelined request has begun already).
        if self.message_done:
            self.request_bytes_seen = False

    # Connection events.

    def data_received(self, data):
        if self.lingering:
            self.linger_read()
            return
        self._unset_keepalive_if_required()
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade header (h2c, websocket) is ignored as HTTP/1.1 allows: the request is answered, and as
            # the parser reads nothing after it, the connection closes then.
            if self.cycle is not None:
                self.cycle.keep_alive = False
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, HeadTooLarge):
                self.refuse(431, f'the request head is over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines')
            else:
                self.refuse(400, f'Bad request: {error}')
            return
        # What the parser holds of a head that is still incomplete counts too, also in the middle of a header.
        if not self.head_done and self.head_bytes > MAX_HEADER_BYTES:
            self.refuse(431, f'the request head is over {MAX_HEADER_BYTES} bytes')

    def eof_received(self):
        """The client ended its side: answer what it sent, then close. Returns True to keep our side open."""
        if self.lingering:
            self.real_transport.close()
            return True
        cycle = self.cycle
        if not self.head_done:
            if self.request_bytes_seen:
                self.refuse(400, 'Bad request: the connection ended in the middle of the request head')
                return True
            return None
        if cycle is None or cycle.response_complete:
            return None
        cycle.keep_alive = False
        if not self.message_done:
            cycle.scope[TRUNCATED] = True
            cycle.more_body = False
            cycle.message_event.set()
        return True

    def connection_lost(self, exc):
        self.clear_timer()
        self.clear_send_timer()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        if self.listener is not None:
            self.listener.open_connections -= 1
        self.lingering = True  # whatever uvicorn closes now is closed at once
        super().connection_lost(exc)

    # Back-pressure: the transport calls these when the unsent replies cross MAX_UNSENT_BYTES and fall back.

    def may_read(self):
        """Whether the connection may be read: always while lingering; otherwise not while pipelined requests
        wait or unsent replies are over MAX_UNSENT_BYTES."""
        return self.lingering or not (self.pipeline or self.flow.write_paused)

    def pause_writing(self):
        self.flow.pause_writing()
        self.flow.pause_reading()
        if self.send_timer is None and not self.lingering:
            self.send_timer = self.loop.call_later(self.limits.body_timeout_seconds, self.send_timed_out)

    def resume_writing(self):
        self.clear_send_timer()
        self.flow.resume_writing()
        self.flow.resume_reading()

    def clear_send_timer(self):
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def send_timed_out(self):
        """The client read none of its replies for body_timeout_seconds: drop them and the connection (close()
        would wait for them to be sent)."""
        self.send_timer = None
        self.real_transport.abort()

    def shutdown(self):
        """The server stops: close idle connections now, the others once their reply is out."""
        if self.cycle is None or self.cycle.response_complete:
            self.clear_timer()
            self.real_transport.close()
        else:
            self.cycle.keep_alive = False

    # Replies of this layer and closing.

    def refuse(self, status, message):
        """Answer a request this layer refuses, then close the connection (lingering)."""
        self.clear_timer()
        if self.real_transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:  # a reply is half sent: nothing sensible can follow it
                self.real_transport.close()
                return
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.real_transport.write(error_response(status, message))
        if self.on_bad_request is not None:
            self.on_bad_request(self.client, status)
        self.linger_and_close()

    def close_connection(self):
        """uvicorn closes after a reply with Connection: close; linger if the client may still be sending."""
        if self.lingering or self.message_done:
            self.clear_timer()
            self.real_transport.close()
        else:
            self.linger_and_close()

    def linger_and_close(self):
        self.clear_timer()
        self.lingering = True
        transport = self.real_transport
        if transport.is_closing():
            return
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self.flow.resume_reading()
        self.linger_deadline = self.loop.time() + LINGER_SECONDS
        self.linger_timer = self.loop.call_later(LINGER_IDLE_SECONDS, self.end_linger)

    def linger_read(self):
        """Data that arrives while lingering is dropped; the connection closes after a quiet second."""
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            remaining = self.linger_deadline - self.loop.time()
            self.linger_timer = self.loop.call_later(max(0.0, min(LINGER_IDLE_SECONDS, remaining)), self.end_linger)

    def end_linger(self):
        self.linger_timer = None
        self.real_transport.close()


class UvicornLogHandler(logging.Handler):
    """uvicorn's warnings and errors as one log line each (its info lines would only repeat ours)."""

    def emit(self, record):
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message += f' {type(error).__name__}: {error}'
        log_line(printable(message, 500))


def listen(host, port):
    """A listening TCP socket on host:port with a backlog of BACKLOG; raises OSError (EADDRINUSE: port taken)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it the reply's head and
    # body (two writes) would wait 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, whose SIGINT and SIGTERM only stop it: uvicorn would raise the signal again once stopped,
    and the process would end by the signal instead of with exit code 0. on_stopping is called at the first."""

    on_stopping = None

    def handle_exit(self, sig, frame):
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self.on_stopping is not None:
            self.on_stopping()

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def serve_app(app, sock, limits, on_bad_request=None, on_stopping=None):
    """Serve the ASGI app on the listening socket until SIGINT or SIGTERM; returns once stopped. on_bad_request is
    called (in the event loop) for each request this layer refuses, on_stopping (in the signal handler) when the
    first signal arrives."""
    # The listening socket as a GuardedSocket (the same descriptor), which enforces max_connections at accept().
    listener = GuardedSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    listener.max_connections = limits.max_connections
    listener.on_refused = on_bad_request
    on_bad_request = staticmethod(on_bad_request) if on_bad_request else None
    protocol = type('BoundModelServerProtocol', (ModelServerProtocol,),
                    {'limits': limits, 'on_bad_request': on_bad_request, 'listener': listener})
    logger = logging.getLogger('uvicorn.error')
    logger.handlers = [UvicornLogHandler()]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    config = uvicorn.Config(app, http=protocol, loop='asyncio', ws='none', lifespan='off', log_config=None,
                            access_log=False, server_header=False, headers=[('server', SERVER_NAME)], backlog=BACKLOG,
                            timeout_keep_alive=limits.keep_alive_seconds,
                            timeout_graceful_shutdown=limits.shutdown_grace_seconds)
    server = Server(config)
    server.on_stopping = on_stopping
    server.run(sockets=[listener])
