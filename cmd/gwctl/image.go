package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"aead.dev/minisign"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/gwagent/gwagent/firmware/blockindex"
	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// maxKeyFile bounds what is read from a minisign secret key file (about
// 300 bytes).
const maxKeyFile = 4 << 10

type signFlags struct {
	key, passwordFile, out, index string
	manifest                      signature.Manifest
}

func (a *app) imageCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Sign firmware images, index their blocks and read their signed metadata"}
	var f signFlags
	sign := &cobra.Command{
		Use:   "sign --key KEY [--version V --compatible TYPE... [--min-version V] [--allow-downgrade]] IMAGE",
		Short: "Write IMAGE.minisig: a minisign signature whose trusted comment carries the update metadata",
		Long: `Sign IMAGE with a minisign secret key (as written by minisign -G) and write
IMAGE.minisig: a prehashed signature, exactly what minisign -S -H writes, that
minisign -V and the agent verify. Sign the file as it is served (the .gz or
.zst file for a compressed image).

With --version and --compatible, the trusted comment carries the metadata the
agent checks before it downloads the image:

  gwagent-manifest:{"version":"2.1.0","compatible":["acme-gw-x86"],"minVersion":"1.4.0"}

--version is the image's semantic version; --compatible (repeatable) the
device types (device.compatible) it fits; --min-version the oldest running
version it may be installed over; --allow-downgrade lets it replace a newer or
equal version. Without them the trusted comment is minisign's usual
"timestamp:… file:… hashed".

With --index (the IMAGE.bidx written by gwctl image index), the metadata also
carries the index's SHA-256 and size ("indexSha256", "indexSize"), so the one
signature authenticates the block index, and through it every block an
adaptive install fetches or reuses (docs/adaptive-updates.md). The index must
describe IMAGE.

An encrypted key's password is read from --password-file, else asked on the
terminal.`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.signImage(cmd, args[0], &f)
		},
	}
	fl := sign.Flags()
	fl.StringVar(&f.key, "key", "", "minisign secret key file (required)")
	fl.StringVar(&f.passwordFile, "password-file", "", "file whose first line is the key's password")
	fl.StringVar(&f.out, "signature-file", "", "where to write the signature (default IMAGE.minisig)")
	fl.StringVar(&f.manifest.Version, "version", "", "the image's version (semantic version, e.g. 2.1.0)")
	fl.StringArrayVar(&f.manifest.Compatible, "compatible", nil, "a device type the image fits (repeatable)")
	fl.StringVar(&f.manifest.MinVersion, "min-version", "", "oldest running version the image may be installed over")
	fl.BoolVar(&f.manifest.AllowDowngrade, "allow-downgrade", false, "allow installing over a newer or equal version")
	fl.StringVar(&f.index, "index", "", "block index of IMAGE (gwctl image index) to cover by the signature")

	var keyFile string
	show := &cobra.Command{
		Use:   "show SIGNATURE [--key PUB]",
		Short: "Print the key ID, trusted comment and update metadata of a .minisig file",
		Long: `Print what a minisign signature file says: the key ID, the trusted comment and
the gwagent metadata it carries. With --key (a minisign public key file) the
trusted comment is authenticated first, as the agent does before the download;
a comment that does not verify is an error.`,
		Args: exactArgs("SIGNATURE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.showSignature(args[0], keyFile)
		},
	}
	show.Flags().StringVar(&keyFile, "key", "", "minisign public key file to authenticate the trusted comment with")
	var blockSize int
	var indexOut string
	index := &cobra.Command{
		Use:   "index [--block-size N] [--output FILE] IMAGE",
		Short: "Write IMAGE.bidx: the block index (size, SHA-256 and per-block SHA-256) for adaptive updates",
		Long: `Write the block index of IMAGE (default IMAGE.bidx): its size and SHA-256, the
block size, and the SHA-256 of every block, in the binary format of
docs/adaptive-updates.md. Serve it next to the image and name it in the update
(indexUri); the agent then fetches only the blocks it does not already hold.
Index the image as it is written to the slot (uncompressed): adaptive installs
fetch ranges of that file. Sign the image with --index so the signature covers
the index.`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.indexImage(args[0], indexOut, blockSize)
		},
	}
	index.Flags().IntVar(&blockSize, "block-size", blockindex.DefaultBlockSize, "block size in bytes: a power of two from 4096 to 16777216")
	index.Flags().StringVarP(&indexOut, "output", "o", "", "where to write the index (default IMAGE.bidx)")
	cmd.AddCommand(sign, show, index)
	return cmd
}

func (a *app) signImage(cmd *cobra.Command, image string, f *signFlags) error {
	if f.key == "" {
		return usageErr("--key is required: the minisign secret key file")
	}
	m := f.manifest
	withMeta := m.Version != "" || len(m.Compatible) > 0 || m.MinVersion != "" || m.AllowDowngrade
	var trusted string
	if f.index != "" && !withMeta {
		return usageErr("--index needs the metadata it is carried in: --version and --compatible")
	}
	if withMeta {
		if m.Version == "" || len(m.Compatible) == 0 {
			return usageErr("metadata needs both --version and at least one --compatible")
		}
		if f.index != "" {
			ix, sum, n, err := readIndex(f.index)
			if err != nil {
				return err
			}
			if err := checkIndexOf(ix, image); err != nil {
				return err
			}
			m.IndexSHA256, m.IndexSize = sum, n
		}
		c, err := m.TrustedComment()
		if err != nil {
			return usageErr("%s", strings.TrimPrefix(err.Error(), "signature: "))
		}
		trusted = c
	}
	key, err := a.readSecretKey(cmd, f.key, f.passwordFile)
	if err != nil {
		return err
	}
	img, err := os.Open(image)
	if err != nil {
		return err
	}
	defer img.Close()
	r := minisign.NewReader(img)
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("read %s: %w", image, err)
	}
	if !withMeta {
		// minisign's own trusted comment for a prehashed signature.
		trusted = "timestamp:" + strconv.FormatInt(time.Now().Unix(), 10) + "\tfile:" + filepath.Base(image) + "\thashed"
	}
	untrusted := "signature from gwctl image sign, key " + signature.FormatKeyID(key.ID())
	sig := r.SignWithComments(key, trusted, untrusted)
	out := f.out
	if out == "" {
		out = image + ".minisig"
	}
	if err := atomicfile.WriteFile(out, sig, 0o644); err != nil {
		return err
	}
	if a.output == "json" {
		return a.printJSON(map[string]any{"signatureFile": out, "keyId": signature.FormatKeyID(key.ID()), "trustedComment": trusted})
	}
	fmt.Fprintf(a.stdout, "wrote %s (key %s)\ntrusted comment: %s\n", out, signature.FormatKeyID(key.ID()), trusted)
	return nil
}

// readSecretKey reads a minisign secret key, decrypting it with the
// password from passwordFile or the terminal when it is encrypted.
func (a *app) readSecretKey(cmd *cobra.Command, path, passwordFile string) (minisign.PrivateKey, error) {
	var key minisign.PrivateKey
	b, err := readLimited(path, maxKeyFile)
	if err != nil {
		return key, fmt.Errorf("--key: %w", err)
	}
	if !minisign.IsEncrypted(b) {
		if err := key.UnmarshalText(bytes.TrimSpace(b)); err != nil {
			return key, usageErr("--key %s is not a minisign secret key: %v", path, err)
		}
		return key, nil
	}
	var password string
	switch {
	case passwordFile != "":
		p, err := readLimited(passwordFile, maxKeyFile)
		if err != nil {
			return key, fmt.Errorf("--password-file: %w", err)
		}
		password, _, _ = strings.Cut(string(p), "\n")
		password = strings.TrimSuffix(password, "\r")
	case term.IsTerminal(int(os.Stdin.Fd())):
		fmt.Fprintf(cmd.ErrOrStderr(), "Password for %s: ", path)
		p, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(cmd.ErrOrStderr())
		if err != nil {
			return key, err
		}
		password = string(p)
	default:
		return key, usageErr("--key %s is encrypted: give --password-file (stdin is not a terminal)", path)
	}
	key, err = minisign.DecryptKey(password, bytes.TrimSpace(b))
	if err != nil {
		return key, &exitError{code: exitFailure, msg: fmt.Sprintf("cannot decrypt %s: wrong password or not a minisign secret key", path), err: err}
	}
	return key, nil
}

func (a *app) showSignature(path, keyFile string) error {
	text, err := readLimited(path, signature.MaxSignatureSize)
	if err != nil {
		return err
	}
	s, err := signature.ParseSignature(text)
	if err != nil {
		return err
	}
	authenticated := false
	if keyFile != "" {
		kb, err := readLimited(keyFile, maxKeyFile)
		if err != nil {
			return fmt.Errorf("--key: %w", err)
		}
		k, err := signature.ParsePublicKey(kb)
		if err != nil {
			return usageErr("--key %s: %v", keyFile, err)
		}
		ring, err := signature.NewKeyRing(k)
		if err != nil {
			return err
		}
		if _, err := ring.NewVerifierFor(text); err != nil {
			return err
		}
		authenticated = true
	}
	m, hasMeta, merr := signature.ParseManifest(s.TrustedComment)
	if a.output == "json" {
		out := map[string]any{"keyId": signature.FormatKeyID(s.KeyID), "prehashed": !s.Legacy,
			"trustedComment": s.TrustedComment, "authenticated": authenticated}
		if hasMeta && merr == nil {
			out["manifest"] = m
		}
		if merr != nil {
			out["manifestError"] = merr.Error()
		}
		if err := a.printJSON(out); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(a.stdout, "key ID:          %s\n", signature.FormatKeyID(s.KeyID))
		fmt.Fprintf(a.stdout, "prehashed:       %v\n", !s.Legacy)
		fmt.Fprintf(a.stdout, "trusted comment: %s\n", s.TrustedComment)
		switch {
		case authenticated:
			fmt.Fprintf(a.stdout, "authenticated:   yes, by %s\n", keyFile)
		default:
			fmt.Fprintf(a.stdout, "authenticated:   no (give --key to check the trusted comment)\n")
		}
		if hasMeta && merr == nil {
			fmt.Fprintf(a.stdout, "version:         %s\n", m.Version)
			fmt.Fprintf(a.stdout, "compatible:      %s\n", strings.Join(m.Compatible, " "))
			if m.MinVersion != "" {
				fmt.Fprintf(a.stdout, "min version:     %s\n", m.MinVersion)
			}
			fmt.Fprintf(a.stdout, "allow downgrade: %v\n", m.AllowDowngrade)
			if m.IndexSHA256 != "" {
				fmt.Fprintf(a.stdout, "block index:     %d bytes, sha256 %s\n", m.IndexSize, m.IndexSHA256)
			}
		} else if !hasMeta {
			fmt.Fprintf(a.stdout, "metadata:        none\n")
		}
	}
	if merr != nil {
		return merr
	}
	return nil
}

// readLimited reads a small file, refusing one larger than limit.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, errors.New(path + ": larger than " + strconv.FormatInt(limit, 10) + " bytes")
	}
	return b, nil
}

// indexImage writes the block index of image.
func (a *app) indexImage(image, out string, blockSize int) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	ix, err := blockindex.Build(bufio.NewReaderSize(f, 1<<20), blockSize)
	if err != nil {
		if errors.Is(err, blockindex.ErrFormat) || strings.Contains(err.Error(), "block size") {
			return usageErr("--block-size: %s", strings.TrimPrefix(err.Error(), "blockindex: "))
		}
		return fmt.Errorf("read %s: %w", image, err)
	}
	b, err := ix.MarshalBinary()
	if err != nil {
		return err
	}
	if out == "" {
		out = image + ".bidx"
	}
	if err := atomicfile.WriteFile(out, b, 0o644); err != nil {
		return err
	}
	sum := sha256.Sum256(b)
	ratio := 0.0
	if ix.ImageSize > 0 {
		ratio = float64(len(b)) / float64(ix.ImageSize) * 100
	}
	if a.output == "json" {
		return a.printJSON(map[string]any{"indexFile": out, "indexSha256": hex.EncodeToString(sum[:]), "indexSize": len(b),
			"imageSize": ix.ImageSize, "imageSha256": ix.ImageHex(), "blockSize": ix.BlockSize, "blocks": ix.Blocks()})
	}
	fmt.Fprintf(a.stdout, "wrote %s: %d blocks of %d bytes, %d bytes (%.3f %% of the image)\nimage sha256: %s\nindex sha256: %s\n",
		out, ix.Blocks(), ix.BlockSize, len(b), ratio, ix.ImageHex(), hex.EncodeToString(sum[:]))
	return nil
}

// readIndex reads and parses a block index file, returning it with its
// SHA-256 (hex) and size.
func readIndex(path string) (*blockindex.Index, string, int64, error) {
	b, err := readLimited(path, blockindex.MaxEncodedSize)
	if err != nil {
		return nil, "", 0, fmt.Errorf("--index: %w", err)
	}
	ix, err := blockindex.Parse(b)
	if err != nil {
		return nil, "", 0, usageErr("--index %s: %v", path, err)
	}
	sum := sha256.Sum256(b)
	return ix, hex.EncodeToString(sum[:]), int64(len(b)), nil
}

// checkIndexOf refuses to sign an index that describes another image.
func checkIndexOf(ix *blockindex.Index, image string) error {
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return fmt.Errorf("read %s: %w", image, err)
	}
	if n != ix.ImageSize || hex.EncodeToString(h.Sum(nil)) != ix.ImageHex() {
		return usageErr("--index describes another image (%d bytes, sha256 %s), not %s (%d bytes)", ix.ImageSize, ix.ImageHex(), image, n)
	}
	return nil
}
