"""The tutorial's pattern (FastAPI + sse-starlette + psycopg2), as the suite runs it.

Each client's generator opens its own connection to the engine (run with --legacy),
declares `c CURSOR FOR TAIL <view>`, and every STREAM_DELAY runs `FETCH ALL c` and
sends the rows as one `new_message` event with `retry: 15000`. psycopg2 is blocking,
as in the tutorial, so a FETCH holds the event loop while it waits.

Environment: TUTORIAL_DSN (libpq conninfo), TUTORIAL_VIEW (default ticks),
STREAM_DELAY (seconds, default 1).
"""

import asyncio
import json
import os

import psycopg2
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

DSN = os.environ.get("TUTORIAL_DSN", "host=127.0.0.1 port=6875 user=materialize dbname=materialize")
VIEW = os.environ.get("TUTORIAL_VIEW", "ticks")
STREAM_DELAY = float(os.environ.get("STREAM_DELAY", "1"))
RETRY_TIMEOUT = 15000  # milliseconds

app = FastAPI()


@app.get("/ticks")
async def message_stream(request: Request):
    def new_messages(cursor):
        cursor.execute("FETCH ALL c")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor.fetchall()]
        # TAIL rows carry mz_timestamp and mz_diff; send the inserted rows.
        return [r for r in rows if r.get("mz_diff", 1) > 0]

    async def event_generator():
        conn = psycopg2.connect(DSN)
        conn.autocommit = True
        cursor = conn.cursor()
        try:
            cursor.execute("BEGIN")
            cursor.execute(f"DECLARE c CURSOR FOR TAIL {VIEW}")
            while True:
                if await request.is_disconnected():
                    break
                rows = new_messages(cursor)
                if rows:
                    yield {
                        "event": "new_message",
                        "id": "message_id",
                        "retry": RETRY_TIMEOUT,
                        "data": json.dumps(rows, default=str),
                    }
                await asyncio.sleep(STREAM_DELAY)
        finally:
            conn.close()

    return EventSourceResponse(event_generator())
