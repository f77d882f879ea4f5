"""makeService(config): the one MultiService that hosts every listener over one store."""

from __future__ import annotations

import functools
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailsuite.auth import Authenticator
from mailsuite.config import Config
from mailsuite.imap.server import IMAPFactory
from mailsuite.listeners import GuardFactory, SharedPortService, refusal_line
from mailsuite.netlimits import ConnectionCounter
from mailsuite.notify import Notifier, PostgresListener
from mailsuite.pop3.server import POP3Factory
from mailsuite.resolver import install_resolver, make_resolver
from mailsuite.smtp.delivery import QueueRunner
from mailsuite.smtp.mx import MXContext, MXFactory
from mailsuite.smtp.srs import SRS
from mailsuite.smtp.submission import SubmissionContext, SubmissionFactory
from mailsuite.store import AsyncStore, Store, open_store
from mailsuite.store.batcher import Batcher
from mailsuite.tls import server_context
from mailsuite.web.site import make_metrics_site, make_site

log = Logger(namespace="mailsuite")


class ReadyService(service.Service):
    """Started last: logs once every listener before it is listening."""

    def __init__(self, listeners: dict[str, str]) -> None:
        self.listeners = listeners

    def startService(self) -> None:
        super().startService()
        log.info("mailsuite ready: {listeners}", listeners=" ".join(
            f"{name}={endpoint}" for name, endpoint in self.listeners.items()))


class StoreService(service.Service):
    """Starts the store's thread pool (and LISTEN thread) with the reactor; joins them after."""

    def __init__(self, pool: ThreadPool, store: Store, listener: PostgresListener | None,
                 lease_prefix: str) -> None:
        self.pool = pool
        self.store = store
        self.listener = listener
        self.lease_prefix = lease_prefix
        #: called at stop; the store closes once the Deferreds they return have fired
        self.drains: list[Callable[[], defer.Deferred]] = []

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        if self.listener is not None:
            self.listener.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = defer.DeferredList([drain() for drain in self.drains])
        d.addCallback(lambda _: self._close())
        return d

    def _close(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        self.pool.stop()
        # Sessions still open die with the process: their maildrop leases and queue claims
        # must not outlive it. The reactor is stopping, so these blocking calls harm nobody.
        self.store.lock_release_all(self.lease_prefix)
        self.store.queue_release(self.lease_prefix)
        self.store.close()


class MailsuiteService(service.MultiService):
    """Every listener over one store, built once the process is final.

    twistd calls makeService before it daemonizes. A database connection, a thread or an
    SQLite lock made then would belong to the parent that exits: the daemon would keep a
    connection to a deleted WAL and hold no POSIX lock, and on PostgreSQL share a socket
    across the fork. So only the config and the certificate are handled here (their errors
    reach the terminal); the store and all that uses it are made in privilegedStartService,
    which twistd calls after the fork and before it drops privileges.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        config.data_path.mkdir(parents=True, exist_ok=True)
        self.tls_options = server_context(config)

    def privilegedStartService(self) -> None:
        self._build()
        super().privilegedStartService()

    def _build(self) -> None:
        config, reactor, tls_options = self.config, self.reactor, self.tls_options
        store = open_store(config.database_url, pool_size=config.database.pool_size)
        pool = ThreadPool(minthreads=1, maxthreads=config.database.pool_size,
                          name="mailsuite-store")
        async_store = AsyncStore(store, pool, reactor)
        notifier = Notifier(reactor)
        store.db.on_change = notifier.publish_from_thread
        listener = None
        if not store.db.is_sqlite:
            # Other processes on this database announce their changes through NOTIFY.
            listener = PostgresListener(store.db.libpq_dsn(), notifier)
        resolver = make_resolver(config)
        install_resolver(resolver)
        # DNS-bound checks block a thread each while they wait; give them room.
        reactor.suggestThreadPoolSize(32)

        lease_prefix = f"{socket.gethostname()[:40]}/{os.getpid()}/{secrets.token_hex(4)}"
        store_service = StoreService(pool, store, listener, lease_prefix)
        store_service.setServiceParent(self)
        runner = QueueRunner(config, async_store, resolver, reactor, holder=lease_prefix)
        runner.setServiceParent(self)
        store_service.drains.append(runner.drain)
        # Local copies and queued recipients of one message commit together; concurrent
        # messages from every SMTP session share a transaction.
        # A commit past smtp.commit_timeout is rolled back, so its 451 never goes with a message.
        submissions = Batcher(
            functools.partial(store.submit_many, timeout=config.smtp.commit_timeout),
            pool, reactor, config.database.batch_max)
        listeners: dict[str, str] = {}
        authenticator = Authenticator(async_store, reactor, config.auth)

        def listen(name: str, endpoint: str, factory: protocol.Factory,
                   implicit_tls: bool = False) -> None:
            if not endpoint:
                return
            refusal = refusal_line(name, config.server.hostname)
            factory = GuardFactory(factory, reactor, config.limits, implicit_tls=implicit_tls,
                                   refuses=authenticator.cooling_off if refusal else None,
                                   refusal=refusal, name=name)
            if implicit_tls:
                # The guard goes inside TLS, where it hears of the handshake's completion.
                factory = TLSMemoryBIOFactory(tls_options, False, factory)
            if config.server.reuse_port:
                child: service.Service = SharedPortService(endpoint, factory, reactor)
            else:
                child = strports.service(endpoint, factory)
            child.setName(name)
            child.setServiceParent(self)
            listeners[name] = endpoint

        if config.listen.mx:
            context = MXContext(
                config=config,
                store=async_store,
                submissions=submissions,
                resolver=resolver,
                reactor=reactor,
                srs=SRS(store.shared_secret("srs").encode("ascii")),
                queued=runner.wake,
            )
            listen("mx", config.listen.mx, MXFactory(context, tls_options))
        submission = SubmissionContext(config, async_store, submissions, authenticator, reactor,
                                       queued=runner.wake)
        runner.on_suppressed = submission.forget_route
        for name, implicit in (("submission", False), ("submissions", True)):
            listen(name, getattr(config.listen, name),
                   SubmissionFactory(submission, tls_options, implicit_tls=implicit),
                   implicit_tls=implicit)
        # The plain and implicit-TLS ports of a protocol share one per-address count.
        pop3_connections = ConnectionCounter(config.pop3.max_connections_per_ip)
        for name, implicit in (("pop3", False), ("pop3s", True)):
            listen(name, getattr(config.listen, name),
                   POP3Factory(config, async_store, authenticator, tls_options, pop3_connections,
                               lease_prefix, implicit_tls=implicit), implicit_tls=implicit)
        imap_ip = ConnectionCounter(config.imap.max_connections_per_ip)
        imap_account = ConnectionCounter(config.imap.max_connections_per_account)
        for name, implicit in (("imap", False), ("imaps", True)):
            listen(name, getattr(config.listen, name),
                   IMAPFactory(config, async_store, authenticator, notifier, tls_options, reactor,
                               imap_ip, imap_account, implicit_tls=implicit), implicit_tls=implicit)
        listen("http", config.listen.http, make_site(async_store, config, resolver,
                                                          runner.wake))
        listen("metrics", config.listen.metrics, make_metrics_site(async_store))
        ReadyService(listeners).setServiceParent(self)
        log.info("mailsuite configured: store={backend}",
                 backend="sqlite" if store.db.is_sqlite else "postgresql")


def make_service(config: Config, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return MailsuiteService(config, reactor)
