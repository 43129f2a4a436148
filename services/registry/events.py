"""Alias-change events: a JSON ``AliasOut`` published on the Redis channel ``draftopd:aliases``.

The inference service and the rollout workers subscribe; they also poll
``GET /drafters/{name}/aliases/{alias}``, so an event lost while Redis is down only delays a
swap. Publishing therefore never fails the alias change: an unreachable Redis is a warning.
"""

from __future__ import annotations

import logging

import redis

from services.registry.schemas import AliasOut

logger = logging.getLogger(__name__)
ALIAS_CHANNEL = "draftopd:aliases"
_TIMEOUT_S = 2.0


class AliasEvents:
    def __init__(self, redis_url: str) -> None:
        # from_url does not connect; the first publish does
        self.client = redis.Redis.from_url(
            redis_url, socket_connect_timeout=_TIMEOUT_S, socket_timeout=_TIMEOUT_S
        )

    def publish(self, alias: AliasOut) -> int:
        """Publish the change; returns the number of subscribers reached (0 if Redis is down)."""
        try:
            receivers = int(self.client.publish(ALIAS_CHANNEL, alias.model_dump_json()))
        except redis.RedisError as err:
            logger.warning(
                "alias %s/%s -> v%d saved, but the event was not published (%s); "
                "subscribers will see it when they poll",
                alias.drafter,
                alias.alias,
                alias.version,
                err,
            )
            return 0
        return receivers

    def close(self) -> None:
        self.client.close()
