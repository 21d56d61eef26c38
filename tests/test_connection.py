"""The one client factory (producer/connection.py) under the event loop the CLI runs."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions
import uvloop

from agentfleet.producer.connection import connect


@pytest.mark.cluster_too
def test_a_socket_the_server_closed_raises_a_connection_error_under_uvloop(server):
    """uvloop raises RuntimeError for a write to a closed socket where asyncio raises OSError;
    every loop of a worker retries ConnectionError, and would crash on the RuntimeError."""

    async def main() -> None:
        client = connect(server.url)
        try:
            await client.set("{m}:probe", 1)
            if hasattr(client, "nodes_manager"):  # a cluster: the key's node's connection
                node = client.get_node_from_key("{m}:probe")
                conn, release = node.acquire_connection(), node.release
                await conn.connect()
            else:
                conn = await client.connection_pool.get_connection()
                release = client.connection_pool.release
            conn._writer.transport.close()  # as a server restart leaves it, unnoticed
            await asyncio.sleep(0.05)
            with pytest.raises(redis.exceptions.ConnectionError, match="closed socket"):
                await conn.send_command("PING")
            result = release(conn)
            if asyncio.iscoroutine(result):
                await result
            assert await client.get("{m}:probe") == b"1"  # the client carries on
        finally:
            await client.aclose()

    uvloop.run(main())
