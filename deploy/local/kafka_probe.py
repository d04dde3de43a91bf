"""Kafka broker health probe for services.sh (stdlib only): a Metadata request that lists at least one broker.

    python3 kafka_probe.py HOST PORT                 plaintext listener
    python3 kafka_probe.py HOST PORT CAFILE ENVFILE  SASL_SSL listener: TLS verified against CAFILE, SCRAM-SHA-512
                                                     login with KAFKA_SASL_USERNAME/PASSWORD from ENVFILE (the
                                                     password is read from the file, never from argv)

Exit 0 when the broker answers with at least one broker registered (the socket server only serves requests once
the broker has started and registered with its co-located controller), 1 otherwise.
"""

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import sys

CLIENT = b"terradapt-health"


def string(b: bytes) -> bytes:
    return struct.pack(">h", len(b)) + b


class Connection:
    """Request/response framing on one socket (request header v1)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.corr = 0

    def read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def call(self, api: int, version: int, body: bytes) -> bytes:
        self.corr += 1
        req = struct.pack(">hhi", api, version, self.corr) + string(CLIENT) + body
        self.sock.sendall(struct.pack(">i", len(req)) + req)
        resp = self.read(struct.unpack(">i", self.read(4))[0])
        if struct.unpack(">i", resp[:4])[0] != self.corr:
            raise ValueError("correlation id")
        return resp[4:]

    def authenticate(self, data: bytes) -> bytes:  # SaslAuthenticate v0 -> server bytes
        resp = self.call(36, 0, struct.pack(">i", len(data)) + data)
        error, mlen = struct.unpack(">hh", resp[:4])
        if error:
            raise PermissionError(error)
        rest = resp[4 + max(mlen, 0) :]
        return rest[4 : 4 + struct.unpack(">i", rest[:4])[0]]

    def scram_sha512(self, user: str, password: str) -> None:
        if struct.unpack(">h", self.call(17, 1, string(b"SCRAM-SHA-512"))[:2])[0]:  # SaslHandshake v1
            raise PermissionError("mechanism")
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={user},r={nonce}"
        server_first = self.authenticate(f"n,,{first_bare}".encode()).decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        if not fields["r"].startswith(nonce):
            raise PermissionError("nonce")
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
        without_proof = f"c=biws,r={fields['r']}"
        auth_message = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(hashlib.sha512(client_key).digest(), auth_message, hashlib.sha512).digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
        server_final = self.authenticate(f"{without_proof},p={proof}".encode()).decode()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha512).digest()
        expected = base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha512).digest()).decode()
        if server_final != f"v={expected}":
            raise PermissionError("server signature")

    def brokers(self) -> int:
        resp = self.call(3, 4, struct.pack(">ib", -1, 0))  # Metadata v4: all topics, no auto-creation
        return struct.unpack(">ii", resp[:8])[1]


def main(argv: list[str]) -> int:
    host, port = argv[1], int(argv[2])
    with socket.create_connection((host, port), timeout=3) as raw:
        raw.settimeout(3)
        if len(argv) > 3:
            cafile, envfile = argv[3], argv[4]
            with open(envfile) as fh:
                creds = dict(line.split("=", 1) for line in fh.read().split() if "=" in line)
            with ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=host) as tls:
                conn = Connection(tls)
                conn.scram_sha512(creds["KAFKA_SASL_USERNAME"], creds["KAFKA_SASL_PASSWORD"])
                return 0 if conn.brokers() >= 1 else 1
        return 0 if Connection(raw).brokers() >= 1 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
