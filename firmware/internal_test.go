package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"
)

func TestParseContentRange(t *testing.T) {
	tests := []struct {
		in           string
		start, total int64
		ok           bool
	}{
		{"bytes 100-199/200", 100, 200, true},
		{"bytes 0-0/*", 0, 0, true},
		{" bytes 5-9/10 ", 5, 10, true},
		{"bytes */200", 0, 0, false},
		{"bytes -5-9/10", 0, 0, false},
		{"items 1-2/3", 0, 0, false},
		{"bytes 1-2/x", 0, 0, false},
		{"", 0, 0, false},
	}
	for _, tc := range tests {
		s, n, ok := parseContentRange(tc.in)
		if s != tc.start || n != tc.total || ok != tc.ok {
			t.Errorf("parseContentRange(%q) = %d, %d, %v; want %d, %d, %v", tc.in, s, n, ok, tc.start, tc.total, tc.ok)
		}
	}
}

func FuzzParseContentRange(f *testing.F) {
	f.Add("bytes 100-199/200")
	f.Add("bytes 0-0/*")
	f.Fuzz(func(t *testing.T, s string) {
		start, total, ok := parseContentRange(s)
		if ok && (start < 0 || total < 0) {
			t.Fatalf("%q: negative %d/%d accepted", s, start, total)
		}
	})
}

func TestRetryAfter(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"3", 3 * time.Second, true},
		{"0", 0, true},
		{"100000", time.Minute, true}, // capped
		{"-1", 0, false},
		{"soon", 0, false},
		{"", 0, false},
		{"Wed, 21 Oct 2015 07:28:00 GMT", 0, true}, // in the past: now
	}
	for _, tc := range tests {
		got, ok := retryAfter(tc.in, time.Minute)
		if got != tc.want || ok != tc.ok {
			t.Errorf("retryAfter(%q) = %s, %v; want %s, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestCompression(t *testing.T) {
	tests := []struct {
		uri, ctype string
		magic      []byte
		want       string
	}{
		{"https://h/fw.img.gz?sig=1", "", nil, "gzip"},
		{"https://h/fw.img.ZST", "", nil, "zstd"},
		{"https://h/fw.img", "application/zstd", nil, "zstd"},
		{"https://h/fw.img", "application/gzip; charset=binary", nil, "gzip"},
		{"https://h/fw.img", "application/octet-stream", []byte{0x1f, 0x8b, 8, 0}, "gzip"},
		{"https://h/fw.img", "", []byte{0x28, 0xb5, 0x2f, 0xfd}, "zstd"},
		{"https://h/fw.img", "", []byte{0x7f, 'E', 'L', 'F'}, ""},
		{"https://h/gz/fw.img", "", nil, ""},
	}
	for _, tc := range tests {
		if got := compression(tc.uri, tc.ctype, tc.magic); got != tc.want {
			t.Errorf("compression(%q, %q, % x) = %q, want %q", tc.uri, tc.ctype, tc.magic, got, tc.want)
		}
	}
}

func TestRedactURI(t *testing.T) {
	tests := map[string]string{
		"https://acct.blob.core.windows.net/c/fw.img?sv=2020&sig=SECRET": "https://acct.blob.core.windows.net/c/fw.img",
		"https://user:pass@h/fw.img#frag":                                "https://h/fw.img",
		"test.com":                                                       "test.com",
		"test.com?token=x":                                               "test.com",
	}
	for in, want := range tests {
		if got := redactURI(in); got != want {
			t.Errorf("redactURI(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestHashReadAhead: the read-ahead hash agrees with a plain one, reports
// how many bytes there were, passes read errors on and stops (its reader
// goroutine too, which goleak checks) when ctx is done.
func TestHashReadAhead(t *testing.T) {
	data := make([]byte, 3*copyBufSize+12345)
	for i := range data {
		data[i] = byte(i * 7)
	}
	boom := errors.New("boom")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	cases := []struct {
		name    string
		ctx     context.Context
		r       io.Reader
		n       int64
		wantN   int64
		wantErr error
	}{
		{"whole", context.Background(), bytes.NewReader(data), int64(len(data)), int64(len(data)), nil},
		{"limit", context.Background(), bytes.NewReader(data), copyBufSize + 1, copyBufSize + 1, nil},
		{"short", context.Background(), bytes.NewReader(data[:100]), int64(len(data)), 100, nil},
		{"empty", context.Background(), bytes.NewReader(nil), 10, 0, nil},
		{"error", context.Background(), io.MultiReader(bytes.NewReader(data[:copyBufSize*2]), iotest.ErrReader(boom)), int64(len(data)), -1, boom},
		{"cancelled", cancelled, bytes.NewReader(data), int64(len(data)), -1, context.Canceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h, n, err := hashReadAhead(tc.ctx, tc.r, tc.n)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			want := sha256.Sum256(data[:tc.wantN])
			if n != tc.wantN || !bytes.Equal(h.Sum(nil), want[:]) {
				t.Fatalf("n = %d, hash %x; want %d, %x", n, h.Sum(nil), tc.wantN, want)
			}
		})
	}
}
