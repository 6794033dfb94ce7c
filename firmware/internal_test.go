package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
	"testing/iotest"
	"testing/synctest"
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

// memStored is a StoredImage over memory that records the sections asked
// for; stored is what "the storage" holds, which may be shorter than the
// image, and err, when set, fails the read of byte failAt.
type memStored struct {
	stored   []byte
	failAt   int64
	err      error
	mu       sync.Mutex
	sections [][2]int64
	closed   bool
}

func (m *memStored) Section(off, n int64) (io.Reader, error) {
	m.mu.Lock()
	m.sections = append(m.sections, [2]int64{off, n})
	m.mu.Unlock()
	end := min(off+n, int64(len(m.stored)))
	r := io.Reader(bytes.NewReader(m.stored[min(off, end):end]))
	if m.err != nil && m.failAt < end {
		r = io.MultiReader(io.LimitReader(r, max(m.failAt-off, 0)), iotest.ErrReader(m.err))
	}
	return r, nil
}

func (m *memStored) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

// TestBackReader: the read-back behind a download reads only what was
// declared durable, in sections aligned to ReadBackAlign (the last ends at
// the end of the image), hashes exactly the stored bytes, tells a short
// storage by its count, passes read errors on and stops (its goroutine
// too, which goleak checks) when cancelled.
func TestBackReader(t *testing.T) {
	data := make([]byte, 5*ReadBackAlign+12345)
	for i := range data {
		data[i] = byte(i * 7)
	}
	boom := errors.New("boom")
	// Durable points as a syncer reports them: unaligned, one not moving.
	steps := []int64{1000, ReadBackAlign + 7, ReadBackAlign + 7, 3*ReadBackAlign - 1, 3 * ReadBackAlign, 4*ReadBackAlign + 99}
	cases := []struct {
		name    string
		img     *memStored
		cancel  bool
		wantN   int64
		wantErr error
	}{
		{"whole", &memStored{stored: data}, false, int64(len(data)), nil},
		{"short storage", &memStored{stored: data[:2*ReadBackAlign+5]}, false, 2*ReadBackAlign + 5, nil},
		{"read error", &memStored{stored: data, failAt: 4 * ReadBackAlign, err: boom}, false, -1, boom},
		{"cancelled", &memStored{stored: data}, true, -1, context.Canceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			b := startBackReader(ctx, tc.img, 0)
			for _, d := range steps {
				b.advance(d)
			}
			if tc.cancel {
				cancel()
			}
			res, err := b.finish("u1", int64(len(data)))
			if serr := b.stop(); serr != nil {
				t.Fatalf("stop: %v", serr)
			}
			if !tc.img.closed {
				t.Error("the stored image was not closed")
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			want := sha256.Sum256(data[:tc.wantN])
			if res.n != tc.wantN || res.sum != hex.EncodeToString(want[:]) || res.updateID != "u1" {
				t.Fatalf("result %+v; want %d bytes, sha256 %x", res, tc.wantN, want)
			}
			var next int64
			for i, sec := range tc.img.sections {
				off, n := sec[0], sec[1]
				last := i == len(tc.img.sections)-1
				if off != next || off%ReadBackAlign != 0 || n <= 0 {
					t.Fatalf("section %d [%d, +%d): want a start at %d, aligned", i, off, n, next)
				}
				if end := off + n; !last && end%ReadBackAlign != 0 || last && end != int64(len(data)) && end > int64(len(tc.img.stored)) {
					t.Fatalf("section %d [%d, %d) of %d: unaligned end before the last", i, off, end, len(tc.img.sections))
				}
				next = off + n
			}
			if tc.wantN == int64(len(data)) && next != int64(len(data)) {
				t.Fatalf("sections %v end at %d, want %d", tc.img.sections, next, len(data))
			}
		})
	}
}

// TestBackReaderWaitsForDurable: nothing is read before the syncer says it
// is durable, and never past the last aligned durable byte until finish.
func TestBackReaderWaitsForDurable(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		img := &memStored{stored: make([]byte, 4*ReadBackAlign)}
		b := startBackReader(t.Context(), img, 0)
		sections := func() [][2]int64 {
			img.mu.Lock()
			defer img.mu.Unlock()
			return slices.Clone(img.sections)
		}
		synctest.Wait()
		if s := sections(); len(s) != 0 {
			t.Fatalf("read %v before anything was durable", s)
		}
		b.advance(ReadBackAlign - 1)
		synctest.Wait()
		if s := sections(); len(s) != 0 {
			t.Fatalf("read %v with less than one aligned unit durable", s)
		}
		b.advance(2*ReadBackAlign + 10)
		synctest.Wait()
		if s := sections(); !slices.Equal(s, [][2]int64{{0, 2 * ReadBackAlign}}) {
			t.Fatalf("sections %v, want [0, 2 units)", s)
		}
		res, err := b.finish("u", 3*ReadBackAlign+10)
		if err != nil || res.n != 3*ReadBackAlign+10 {
			t.Fatalf("finish: %+v, %v", res, err)
		}
		if s := sections(); !slices.Equal(s, [][2]int64{{0, 2 * ReadBackAlign}, {2 * ReadBackAlign, ReadBackAlign + 10}}) {
			t.Fatalf("sections %v", s)
		}
		if err := b.stop(); err != nil {
			t.Fatal(err)
		}
	})
}
