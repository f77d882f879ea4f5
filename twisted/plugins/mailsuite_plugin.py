"""twistd plugin: `twistd -n mailsuite --config conf/mailsuite.toml`."""

from __future__ import annotations

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", "conf/mailsuite.toml", "Path to the mailsuite TOML configuration."],
    ]


@implementer(IServiceMaker, IPlugin)
class MailsuiteServiceMaker:
    tapname = "mailsuite"
    description = "mailsuite: SMTP, IMAP, POP3 and an HTTP API over one mail store"
    options = Options

    def makeService(self, options: Options):  # type: ignore[no-untyped-def]
        # Imported here so that listing twistd plugins does not import the reactor.
        from mailsuite.config import ConfigError, load_config
        from mailsuite.service import make_service

        try:
            config = load_config(options["config"])
        except ConfigError as exc:
            sys.stderr.write(f"mailsuite: {exc}\n")
            raise SystemExit(2) from exc
        return make_service(config)


service_maker = MailsuiteServiceMaker()
