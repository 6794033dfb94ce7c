package firmware_test

import (
	"context"
	"encoding/binary"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/firmware"
)

// attempts matches the end of a message of a download retried and given up.
const attempts = ` \([0-9]+ attempts over [0-9.]+m?s\)`

// TestGiveUpNamesHostAndCause: a download that gives up says where from
// and what failed (connect, DNS, TLS, HTTP status, a body cut short with
// the sizes), and how often and how long it tried; never only "context
// deadline exceeded".
func TestGiveUpNamesHostAndCause(t *testing.T) {
	img := randomImage(t, 1<<20)
	srv := newImageServer(t)
	srv.add("/fw.img", img)
	// The first answer stops half way, every later one (Range) at once:
	// the download stops making progress at 512 KiB.
	srv.setFault(func(n int, w http.ResponseWriter, r *http.Request, body []byte) bool {
		if r.URL.Path != "/fw.img" {
			return false
		}
		if r.Header.Get("Range") == "" {
			cutAfter(w, r, body, len(body)/2)
		} else {
			cutAfter(w, r, body, 0)
		}
		return true
	})
	tlsSrv := httptest.NewUnstartedServer(http.NotFoundHandler())
	tlsSrv.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshake the client refuses
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)
	dns := nxdomainServer(t)
	refused := freePortURL(t) // a listener opened and closed: nothing listens there

	tests := []struct {
		name   string
		url    string
		config func(*firmware.Config)
		want   string // a regular expression for the whole message
	}{
		{name: "refused port", url: refused,
			want: `^download from ` + regexp.QuoteMeta(refused) + `: connect: connection refused` + attempts + `$`},
		{name: "refused port until the download timeout",
			url: refused,
			config: func(c *firmware.Config) {
				c.DownloadTimeout = 600 * time.Millisecond
				c.RetryMaxElapsed = time.Minute
			},
			want: `^download from ` + regexp.QuoteMeta(refused) + `: did not finish within 600ms \(received 0 bytes, size unknown\); last failure: connect: connection refused` + attempts + `$`},
		{name: "unknown host", url: "http://fw.gwagent.test:8080/fw.img",
			config: func(c *firmware.Config) {
				d := &net.Dialer{Timeout: time.Second, Resolver: &net.Resolver{PreferGo: true,
					Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
						return (&net.Dialer{}).DialContext(ctx, "udp", dns)
					}}}
				c.HTTPClient = &http.Client{Transport: &http.Transport{DialContext: d.DialContext}}
			},
			want: `^download from http://fw\.gwagent\.test:8080/fw\.img: resolve fw\.gwagent\.test: no such host` + attempts + `$`},
		{name: "untrusted certificate", url: tlsSrv.URL + "/fw.img",
			want: `^download from ` + regexp.QuoteMeta(tlsSrv.URL) + `/fw\.img: tls: failed to verify certificate: x509: certificate signed by unknown authority$`},
		{name: "HTTP status", url: srv.URL + "/missing.img",
			want: `^download from ` + regexp.QuoteMeta(srv.URL) + `/missing\.img: HTTP 404 Not Found$`},
		{name: "body cut short", url: srv.URL + "/fw.img",
			want: `^download from ` + regexp.QuoteMeta(srv.URL) + `/fw\.img: the connection closed before the whole image arrived: received 524288 of 1048576 bytes` + attempts + `$`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder()
			cfg := testConfig(t, t.TempDir(), plainFile{&fileAB{dir: t.TempDir()}}, rec)
			cfg.RetryMaxElapsed = 400 * time.Millisecond
			if tc.config != nil {
				tc.config(&cfg)
			}
			m := startManager(t, cfg)
			if _, err := m.Start(firmware.Request{URI: tc.url}); err != nil {
				t.Fatal(err)
			}
			last := rec.waitTerminal(t, 30*time.Second)
			if last.Phase != firmware.PhaseFailed || last.Err.Code != firmware.CodeDownload {
				t.Fatalf("ended %s %+v, want failed with %s", last.Phase, last.Err, firmware.CodeDownload)
			}
			if !regexp.MustCompile(tc.want).MatchString(last.Err.Message) {
				t.Errorf("message %q\nwant it to match %s", last.Err.Message, tc.want)
			}
			if strings.Contains(last.Err.Message, "context deadline exceeded") {
				t.Errorf("message %q says only that a deadline passed", last.Err.Message)
			}
		})
	}
}

// nxdomainServer answers every DNS query on a loopback UDP port with
// NXDOMAIN ("no such host"), so a name fails to resolve without a query
// leaving the machine.
func nxdomainServer(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, addr, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if n < 12 {
				continue
			}
			// The query with its header turned into an answer: QR set,
			// opcode and RD kept, RA set, RCODE 3 (NXDOMAIN); the
			// question stays, no records.
			resp := append([]byte(nil), buf[:n]...)
			flags := binary.BigEndian.Uint16(resp[2:4])
			flags = 0x8000 | flags&0x7900 | 0x0080 | 3
			binary.BigEndian.PutUint16(resp[2:4], flags)
			binary.BigEndian.PutUint16(resp[6:8], 0)   // answers
			binary.BigEndian.PutUint16(resp[8:10], 0)  // authority
			binary.BigEndian.PutUint16(resp[10:12], 0) // additional
			resp = trimAdditional(resp)
			pc.WriteTo(resp, addr)
		}
	}()
	return pc.LocalAddr().String()
}

// trimAdditional drops what follows the first question (an EDNS OPT
// record the resolver may add), whose count the answer just set to zero.
func trimAdditional(msg []byte) []byte {
	i := 12
	for i < len(msg) && msg[i] != 0 {
		i += int(msg[i]) + 1
	}
	i += 1 + 4 // the root label, QTYPE and QCLASS
	if i > len(msg) {
		return msg
	}
	return msg[:i]
}
