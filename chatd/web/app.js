// chatd page: built on the seed's WebSocketClient
