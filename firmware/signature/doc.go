// Package signature verifies firmware images signed with the standard minisign
// tool (detached .minisig files), streaming, against a folder of trusted keys.
//
// What it owns:
//
//   - The key ring: LoadKeys reads every *.pub file of a folder (as written by
//     `minisign -G -p`). Keys are rotated by adding and removing files; a
//     signature is checked against the key whose ID it names, and one naming
//     any other ID fails with "signed by unknown key ID …" (ErrUnknownKey).
//   - Streaming verification in constant memory: a Verifier is an io.Writer
//     fed the image as it is downloaded or written, then Verify(sig) decides.
//     Prehashed signatures (Ed25519 over BLAKE2b-512 of the image; the default
//     of minisign ≥ 0.10) are checked from the running hash, whenever the
//     signature arrives. Legacy signatures (pure Ed25519 over the whole image,
//     `minisign -l`) are streamed too when the signature is known before the
//     first byte (KeyRing.NewVerifierFor): Ed25519 hashes R ‖ A ‖ message with
//     SHA-512 and R, A come from the signature and the key, so the message
//     part can be hashed as it passes; the final equation is that of
//     crypto/ed25519. A legacy signature presented only at the end is refused
//     with ErrLegacy ("re-sign with minisign -H or minisign ≥ 0.10").
//   - The trusted comment, verified like minisign does, is returned in Info
//     for logging.
//   - Update metadata (manifest.go): a trusted comment that starts with
//     "gwagent-manifest:" carries a JSON Manifest (version, compatible
//     device types, minVersion, allowDowngrade). It is authenticated with
//     the comment, so NewVerifierFor vouches for it before the first image
//     byte; ParseManifest reads it strictly and Manifest.Check decides
//     (ErrIncompatible, ErrDowngrade) by semantic-version precedence.
//   - Resume: MarshalBinary/UnmarshalBinary save and restore the running
//     state (BLAKE2b-512 or SHA-512 state from x/crypto and the standard
//     library, plus byte count and an up-front signature) so a download
//     checkpoint can carry it across a restart.
//   - Policy (signature.keyDir, signature.allowUnsigned): ErrUnsigned,
//     ErrBadSignature, ErrUnknownKey. A signature that is present is always
//     checked, even when unsigned images are allowed.
//
// What it must not do: fetch signatures or images (the firmware package
// downloads, with its retry rules, and feeds the bytes here), write files,
// log (results and errors carry what a caller logs), or cache a key folder
// beyond one KeyRing (a Policy reloads it per update so rotation needs no
// restart). Parsing of the minisign formats is aead.dev/minisign's; this
// package adds only the digest-level Ed25519 checks that library does not
// expose for a running hash.
package signature
