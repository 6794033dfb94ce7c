package fleet

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"aead.dev/minisign"
)

// Image is the firmware image the fleet is updated to: signed with one
// key, served over HTTP, with two key folders: one trusting the signing
// key (good devices) and one trusting another key (bad devices).
type Image struct {
	Version       string
	URI           string
	SignatureURI  string
	SHA256        string
	Size          int64
	TrustedKeyDir string
	OtherKeyDir   string

	srv *http.Server
}

// newImage writes a random image of size bytes, signs it with gwctl image
// sign and serves dir over HTTP on a free loopback port.
func newImage(ctx context.Context, dir string, gwctl func(context.Context, ...string) error, version string, size int) (*Image, error) {
	files := filepath.Join(dir, "files")
	img := &Image{Version: version, Size: int64(size),
		TrustedKeyDir: filepath.Join(dir, "keys-trusted"), OtherKeyDir: filepath.Join(dir, "keys-other")}
	for _, d := range []string{files, img.TrustedKeyDir, img.OtherKeyDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	secret := filepath.Join(dir, "signing.key")
	if err := writeKeyPair(secret, filepath.Join(img.TrustedKeyDir, "fleet.pub")); err != nil {
		return nil, err
	}
	if err := writeKeyPair(filepath.Join(dir, "other.key"), filepath.Join(img.OtherKeyDir, "other.pub")); err != nil {
		return nil, err
	}
	body := make([]byte, size)
	_, _ = rand.Read(body)
	sum := sha256.Sum256(body)
	img.SHA256 = hex.EncodeToString(sum[:])
	name := "gw-firmware-" + version + ".bin"
	path := filepath.Join(files, name)
	if err := os.WriteFile(path, body, 0o644); err != nil {
		return nil, err
	}
	if err := gwctl(ctx, "image", "sign", "--key", secret, path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	img.srv = &http.Server{Handler: http.FileServer(http.Dir(files))}
	go func() { _ = img.srv.Serve(ln) }()
	base := "http://" + ln.Addr().String() + "/"
	img.URI, img.SignatureURI = base+name, base+name+".minisig"
	return img, nil
}

func writeKeyPair(secretFile, publicFile string) error {
	pub, priv, err := minisign.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	privText, err := priv.MarshalText()
	if err != nil {
		return err
	}
	pubText, err := pub.MarshalText()
	if err != nil {
		return err
	}
	if err := os.WriteFile(secretFile, privText, 0o600); err != nil {
		return err
	}
	return os.WriteFile(publicFile, pubText, 0o644)
}

func (img *Image) close() { _ = img.srv.Close() }
