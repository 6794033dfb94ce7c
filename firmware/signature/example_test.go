package signature_test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"aead.dev/minisign"

	"github.com/gwagent/gwagent/firmware/signature"
)

// A download streamed into a slot and, through io.TeeReader, into the
// Verifier; the signature arrives at the end.
func ExampleKeyRing_NewVerifier() {
	// Setup: a key folder with one key and a signed image. On a device the
	// folder is provisioned and the image comes from the network.
	dir, _ := os.MkdirTemp("", "keys")
	defer os.RemoveAll(dir)
	pub, priv, _ := minisign.GenerateKey(nil)
	pubText, _ := pub.MarshalText()
	_ = os.WriteFile(filepath.Join(dir, "release.pub"), pubText, 0o644)
	image := strings.Repeat("firmware ", 100000)
	r := minisign.NewReader(strings.NewReader(image))
	_, _ = io.Copy(io.Discard, r)
	sig := r.SignWithComments(priv, "gwagent 2.1.0", "signature")

	ring, err := signature.LoadKeys(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	v := ring.NewVerifier()
	var slot bytes.Buffer
	_, _ = io.Copy(&slot, io.TeeReader(strings.NewReader(image), v))
	if err := v.Verify(sig); err != nil {
		fmt.Println(err)
		return
	}
	info, _ := v.Verified()
	fmt.Println(info.Bytes, info.TrustedComment, info.KeyID == pub.ID())

	// The same stream with one byte changed.
	v = ring.NewVerifier()
	_, _ = v.Write([]byte("F" + image[1:]))
	fmt.Println(v.Verify(sig) != nil)
	// Output:
	// 900000 gwagent 2.1.0 true
	// true
}
