package firmware

import (
	"testing"
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
