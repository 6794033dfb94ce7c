// Package wsstream carries MQTT over WebSocket the way IoT Hub does on
// port 443 (path /$iothub/websocket, subprotocol mqtt): the MQTT byte
// stream travels in binary WebSocket messages whose boundaries need not
// match the MQTT packets'. Both ends use it: the agent's session and
// gwhub's listener.
package wsstream

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/gorilla/websocket"
)

// ErrNotBinary is Read's error for a text message: MQTT is binary only.
var ErrNotBinary = errors.New("wsstream: WebSocket message is not binary")

// Conn is a WebSocket connection read and written as a byte stream. The
// embedded net.Conn is the connection under it (addresses, deadlines,
// Close).
type Conn struct {
	net.Conn
	ws *websocket.Conn

	r  io.Reader  // the message being read; owned by the reading goroutine
	wm sync.Mutex // whole-message writes
}

// New returns ws as a byte stream over under, the connection ws runs on.
func New(ws *websocket.Conn, under net.Conn) *Conn {
	return &Conn{Conn: under, ws: ws}
}

// Read reads the stream across message boundaries.
func (c *Conn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, ErrNotBinary
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 {
				continue
			}
			return n, nil
		}
		return n, err
	}
}

// Write sends p as one binary message.
func (c *Conn) Write(p []byte) (int, error) {
	c.wm.Lock()
	defer c.wm.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}
