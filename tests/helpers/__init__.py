"""Helpers shared by the tests, one copy each, by concern (fixtures live in
``tests/conftest.py``; a test module never imports from another):

* ``tokens``: ``SECRET``, ``make_token``, hand-made (forged) JWTs;
* ``clients``: the JSON ``Client`` on trio-websocket, ``connect``, ``ws_open``,
  ``ws_url``, ``closed_with``;
* ``raw``: WebSocket by hand: frames built and parsed byte by byte, ``RawWS``
  on wsproto;
* ``http_client``: ``http_request`` (one request over h11) and ``RawHttp``
  (hand-written bytes on one connection), both giving an ``HttpReply``;
* ``servers``: ``running`` (in-process), ``chatd_process`` (a real process),
  config files, ``free_port``, ``REPO``;
* ``proxies``: one TCP forwarder that a test can cut and restore;
* ``services``: throwaway PostgreSQL and Redis servers;
* ``cluster``: several nodes behind a load balancer, and their clients;
* ``store``: driving a store directly (messages, commit callbacks, a held
  writer);
* ``fuzzing``: hypothesis strategies for client frames;
* ``clocks``: a wall clock the test moves; ``waits``: polling until true;
* ``echo``: an echo server on chatd's own transport (the Autobahn cases).
"""
