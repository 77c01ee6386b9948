"""How a client logs in to the broker: one definition of the login options that `serve`,
`worker` and `start` share (`--username`, `--password[-file]`, `--tls-*`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.options import opt
from sfprompt.protocol.client_config import ClientConfig, connection_config, read_password


@dataclass(frozen=True)
class BrokerLogin:
    """User, password and TLS files; a URL's own `user:password@` counts where no user is given."""

    username: str | None = field(
        default=None, metadata=opt("Broker user name (default: the URL's, if it has one).")
    )
    password: str | None = field(
        default=None,
        metadata=opt(
            "Broker password (default: the URL's); prefer --password-file or the variable, "
            "which `ps` does not show.",
            envvar="SFPROMPT_BROKER_PASSWORD",
        ),
    )
    password_file: Path | None = field(
        default=None,
        metadata=opt(
            "File whose first line is the password (broker-config and the embedded broker write "
            "clients/ID/password).",
            exists=True,
            dir_okay=False,
        ),
    )
    tls_ca: str | None = field(
        default=None, metadata=opt("CA certificate of the broker (switches TLS on).")
    )
    tls_cert: str | None = field(default=None, metadata=opt("This client's certificate."))
    tls_key: str | None = field(default=None, metadata=opt("This client's private key."))

    def client_config(self, url: str, client_id: str, **options: Any) -> ClientConfig:
        """The connection settings for `url` as `client_id`; raises ValueError for TLS files
        without a CA, OSError for an unreadable password file."""
        return connection_config(
            url,
            client_id,
            username=self.username,
            password=read_password(self.password, self.password_file),
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            **options,
        )
