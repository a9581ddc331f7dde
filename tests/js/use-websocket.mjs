// The seed's useWebSocket hook, copied unchanged from
// shared/spec/websocket-protocol.fr.md (section "Hook React pour WebSocket").
// It expects the seed's WebSocketClient class as a global.
import { useEffect, useRef, useState } from 'react';

export const useWebSocket = (token) => {
    const [connected, setConnected] = useState(false);
    const [messages, setMessages] = useState([]);
    const ws = useRef(null);

    useEffect(() => {
        if (!token) return;

        const client = new WebSocketClient(token);
        ws.current = client;

        // Gestionnaires de messages
        client.onMessage('room_message', (data) => {
            setMessages(prev => [...prev, data]);
        });

        client.onMessage('direct_message', (data) => {
            setMessages(prev => [...prev, data]);
        });

        client.onMessage('message_history', (data) => {
            setMessages(prev => [...data.messages, ...prev]);
        });

        client.connect();

        return () => {
            client.disconnect();
        };
    }, [token]);

    const sendMessage = (room, content) => {
        if (ws.current) {
            ws.current.sendRoomMessage(room, content);
        }
    };

    const joinRoom = (room) => {
        if (ws.current) {
            ws.current.joinRoom(room);
        }
    };

    return {
        connected,
        messages,
        sendMessage,
        joinRoom,
        client: ws.current
    };
};
