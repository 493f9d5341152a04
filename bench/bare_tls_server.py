"""The TLS anchor: bench/bare_server.py's ThreadingHTTPServer with its listening socket
wrapped by the stdlib ssl module, the way a plain http.server is usually given TLS.

    python -m bench.bare_tls_server CERT KEY      # prints its port
"""

from __future__ import annotations

import ssl
import sys

from bench.bare_server import Handler, Server

if __name__ == "__main__":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    server = Server(("127.0.0.1", 0), Handler)
    # The handshake then runs in accept(), in the accept thread: fine for an anchor,
    # not for a daemon that faces the network (smechvisord does it per connection).
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()
