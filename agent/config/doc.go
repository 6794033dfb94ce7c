// Package config reads gwagent's configuration in one place: a YAML file,
// GWAGENT_… environment variables and command-line flags, merged by viper and
// handed on as typed structs.
//
// It owns the list of keys, their defaults and their validation; every error
// names the offending key so a bad file fails at start with a message a person
// can act on. It must not start anything, open connections or keep global
// state: Load is a pure function of the file, the environment and the flags.
package config
