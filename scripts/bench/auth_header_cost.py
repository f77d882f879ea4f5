"""CPU time of authentication_results() on a message with one long folded header field.

    .venv/bin/python scripts/bench/auth_header_cost.py 8 20

Each argument is a header size in MB; the field is folded every 76 octets. No DNS server is
needed: the resolver points at a closed loopback port and times out at once, so what is
measured is the parsing, not the network.
"""

from __future__ import annotations

import sys
import time

import dns.resolver

from mailsuite.smtp import authresults


def folded_message(megabytes: float) -> bytes:
    line = b"\r\n\t" + b"x" * 73
    count = int(megabytes * 1024 * 1024) // len(line)
    return (b"From: a@nothing.invalid\r\nX-Long: start" + line * count
            + b"\r\nSubject: test\r\n\r\nbody\r\n")


def main(sizes: list[str]) -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = 9
    resolver.timeout = resolver.lifetime = 0.5
    spf = authresults.SPFOutcome("none", "not checked")
    for size in sizes:
        raw = folded_message(float(size))
        start = time.process_time()
        authresults.authentication_results(raw, "mx.example", resolver, "127.0.0.1",
                                           "client.example", "a@nothing.invalid", spf)
        print(f"{len(raw) / 1048576:.1f} MB folded header: "
              f"{time.process_time() - start:.2f} s CPU", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["8", "20"])
