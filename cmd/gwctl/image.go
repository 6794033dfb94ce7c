package main

import (
	"bytes"
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

	"github.com/gwagent/gwagent/firmware/signature"
	"github.com/gwagent/gwagent/internal/atomicfile"
)

// maxKeyFile bounds what is read from a minisign secret key file (about
// 300 bytes).
const maxKeyFile = 4 << 10

type signFlags struct {
	key, passwordFile, out string
	manifest               signature.Manifest
}

func (a *app) imageCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Sign firmware images and read their signed metadata"}
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
	cmd.AddCommand(sign, show)
	return cmd
}

func (a *app) signImage(cmd *cobra.Command, image string, f *signFlags) error {
	if f.key == "" {
		return usageErr("--key is required: the minisign secret key file")
	}
	m := f.manifest
	withMeta := m.Version != "" || len(m.Compatible) > 0 || m.MinVersion != "" || m.AllowDowngrade
	var trusted string
	if withMeta {
		if m.Version == "" || len(m.Compatible) == 0 {
			return usageErr("metadata needs both --version and at least one --compatible")
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
