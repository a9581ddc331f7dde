// The seed's WebSocketClient, copied unchanged from
// shared/spec/websocket-protocol.fr.md (section "Client JavaScript/React").
// The browser page (index.html, app.js) is built on it; tests/js runs it too.
class WebSocketClient {
    constructor(token) {
        this.token = token;
        this.ws = null;
        this.reconnectAttempts = 0;
        this.maxReconnectAttempts = 5;
        this.reconnectDelay = 1000;
        this.messageHandlers = new Map();
    }

    connect() {
        this.ws = new WebSocket(`ws://localhost:8080/ws/chat?token=${this.token}`);
        
        this.ws.onopen = () => {
            console.log('WebSocket connecté');
            this.reconnectAttempts = 0;
        };

        this.ws.onmessage = (event) => {
            const message = JSON.parse(event.data);
            this.handleMessage(message);
        };

        this.ws.onclose = (event) => {
            console.log('WebSocket fermé:', event.code, event.reason);
            this.handleReconnect();
        };

        this.ws.onerror = (error) => {
            console.error('Erreur WebSocket:', error);
        };
    }

    handleMessage(message) {
        const handler = this.messageHandlers.get(message.type);
        if (handler) {
            handler(message.data);
        }
    }

    onMessage(type, handler) {
        this.messageHandlers.set(type, handler);
    }

    send(type, data) {
        if (this.ws && this.ws.readyState === WebSocket.OPEN) {
            const message = {
                type,
                data,
                timestamp: new Date().toISOString()
            };
            this.ws.send(JSON.stringify(message));
        }
    }

    joinRoom(room) {
        this.send('join_room', { room });
    }

    sendRoomMessage(room, content) {
        this.send('room_message', {
            room,
            content,
            message_type: 'text'
        });
    }

    sendDirectMessage(toUserId, content) {
        this.send('direct_message', {
            to_user_id: toUserId,
            content,
            message_type: 'text'
        });
    }

    getRoomHistory(room, limit = 50, offset = 0) {
        this.send('room_history', { room, limit, offset });
    }

    handleReconnect() {
        if (this.reconnectAttempts < this.maxReconnectAttempts) {
            this.reconnectAttempts++;
            setTimeout(() => {
                console.log(`Tentative de reconnexion ${this.reconnectAttempts}`);
                this.connect();
            }, this.reconnectDelay * this.reconnectAttempts);
        }
    }

    disconnect() {
        if (this.ws) {
            this.ws.close();
        }
    }
}
