"""makeService(config): the one MultiService that hosts every listener over one store."""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailsuite.config import Config
from mailsuite.smtp.dns import install_resolver, make_resolver
from mailsuite.smtp.mx import MXContext, MXFactory
from mailsuite.store import AsyncStore, Store, open_store
from mailsuite.store.batcher import Batcher
from mailsuite.tls import server_context

log = Logger(namespace="mailsuite")


class ThreadPoolService(service.Service):
    """Starts the store's thread pool with the reactor and joins it at shutdown."""

    def __init__(self, pool: ThreadPool, store: Store) -> None:
        self.pool = pool
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
        self.store.close()


def make_service(config: Config, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config.data_path.mkdir(parents=True, exist_ok=True)
    store = open_store(config.database_url, pool_size=config.database.pool_size)
    pool = ThreadPool(minthreads=1, maxthreads=config.database.pool_size, name="mailsuite-store")
    async_store = AsyncStore(store, pool, reactor)
    resolver = make_resolver(config)
    install_resolver(resolver)
    # DNS-bound checks block a thread each while they wait; give them room.
    reactor.suggestThreadPoolSize(32)
    tls_options = server_context(config)

    top = service.MultiService()
    ThreadPoolService(pool, store).setServiceParent(top)
    if config.listen.mx:
        context = MXContext(
            config=config,
            store=async_store,
            deliveries=Batcher(store.deliver_many, pool, reactor, config.database.batch_max),
            resolver=resolver,
            reactor=reactor,
        )
        mx = strports.service(config.listen.mx, MXFactory(context, tls_options))
        mx.setName("mx")
        mx.setServiceParent(top)
    log.info("mailsuite configured: store={backend} mx={mx}",
             backend="sqlite" if store.db.is_sqlite else "postgresql",
             mx=config.listen.mx or "off")
    return top
