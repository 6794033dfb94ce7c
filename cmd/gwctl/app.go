package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gwagent/gwagent/internal/cli"
	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// Exit codes.
const (
	exitOK       = 0
	exitFailure  = 1             // the hub refused the call, the device answered >= 400, the update failed
	exitTimeout  = 2             // --watch saw no final state before --timeout
	exitUsage    = cli.ExitUsage // bad flags, arguments or connection string (EX_USAGE)
	exitCanceled = 130
)

const exitCodesHelp = `Exit codes:
  0    success (for update --watch: the update completed)
  1    failure: the hub refused the call, the device answered a status >= 400,
       or the update failed or was rolled back
  2    update --watch: no final state before --timeout
  64   invalid usage: flags, arguments or connection string
  130  interrupted`

const (
	envConnectionString = "IOTHUB_CONNECTION_STRING"
	envCAFile           = "GWCTL_CA_FILE"
	envEndpoint         = "GWCTL_ENDPOINT"
)

// app is one gwctl invocation: its streams, environment and global flags.
type app struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	isTerminal     func() bool    // stdout is a terminal: draw progress bars
	loc            *time.Location // time zone of printed times; nil = local

	connectionString    string
	dpsConnectionString string // gwctl dps
	caFile              string
	output              string
	endpoint            string
	insecure            bool
	verbose             bool

	log *zap.Logger
}

// exitError carries the exit code of a failed command; msg is printed as is.
type exitError struct {
	code int
	msg  string
	err  error
}

func (e *exitError) Error() string { return e.msg }
func (e *exitError) Unwrap() error { return e.err }

func usageErr(format string, args ...any) error {
	return &exitError{code: exitUsage, msg: fmt.Sprintf(format, args...)}
}

func (a *app) run(ctx context.Context, args []string) int {
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	err := root.ExecuteContext(ctx)
	if a.log != nil {
		_ = a.log.Sync()
	}
	if err == nil {
		return exitOK
	}
	var ee *exitError
	switch {
	case errors.As(err, &ee):
	case cli.IsUsage(err): // unknown flags and subcommands, cobra's argument checks
		ee = &exitError{code: exitUsage, msg: err.Error(), err: err}
	default:
		ee = &exitError{code: exitFailure, msg: err.Error(), err: err}
	}
	if ee.msg != "" {
		fmt.Fprintf(a.stderr, "gwctl: %s\n", ee.msg)
	}
	return ee.code
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "gwctl",
		Short: "Operate gwagent devices through IoT Hub's service API",
		Long: `gwctl registers devices, reads and writes device twins, invokes direct methods,
and starts and watches firmware updates. It speaks IoT Hub's service REST API
with a service connection string, so it works the same against the local gwhub
and a real Azure IoT Hub.

The connection string comes from --connection-string or ` + envConnectionString + `
(HostName=…;SharedAccessKeyName=…;SharedAccessKey=…). For gwhub, point --ca-file
(or ` + envCAFile + `) at its ca.pem; without it the system roots are trusted.

` + exitCodesHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if a.output == "table" { // the rollout commands' name for text
				a.output = "text"
			}
			if a.output != "text" && a.output != "json" {
				return usageErr("--output must be text or json (or table, the same as text), not %q", a.output)
			}
			a.log = a.newLogger()
			return nil
		},
	}
	f := root.PersistentFlags()
	f.StringVar(&a.connectionString, "connection-string", "", "service connection string (default $"+envConnectionString+")")
	f.StringVar(&a.caFile, "ca-file", "", "PEM file of the CA to trust, e.g. gwhub's DIR/ca.pem (default $"+envCAFile+", else the system roots)")
	f.StringVarP(&a.output, "output", "o", "text", "output format: text (table) or json")
	f.BoolVarP(&a.verbose, "verbose", "v", false, "log requests and retries to stderr")
	// A local hub on a non-standard port; the real service is always
	// https://{HostName}.
	f.StringVar(&a.endpoint, "endpoint", "", "reach the hub at this URL instead of https://{HostName}, e.g. https://127.0.0.1:8443 for a local gwhub (default $"+envEndpoint+")")
	f.BoolVar(&a.insecure, "insecure", false, "allow an http:// --endpoint, which sends the service token in clear text")

	root.AddCommand(a.deviceCommand(), a.twinCommand(), a.methodCommand(), a.updateCommand(), a.queryCommand(), a.imageCommand(), a.dpsCommand(), a.rolloutCommand())
	cli.Setup(root)
	return root
}

func (a *app) newLogger() *zap.Logger {
	if !a.verbose {
		return zap.NewNop()
	}
	enc := zap.NewDevelopmentEncoderConfig()
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(a.stderr), zapcore.DebugLevel)
	return zap.New(core).Named("gwctl")
}

// client builds the service client from the global flags and environment.
func (a *app) client() (*service.Client, error) {
	raw := a.connectionString
	if raw == "" {
		raw = a.getenv(envConnectionString)
	}
	if raw == "" {
		return nil, usageErr("no connection string: set --connection-string or %s", envConnectionString)
	}
	cs, err := iothub.ParseConnectionString(raw)
	if err != nil {
		return nil, usageErr("%v", err)
	}
	if !cs.IsService() {
		return nil, usageErr("that is a device connection string; gwctl needs a service one (HostName=…;SharedAccessKeyName=…;SharedAccessKey=…)")
	}
	opts, err := a.serviceOptions("service")
	if err != nil {
		return nil, err
	}
	c, err := service.New(cs, opts)
	if err != nil {
		return nil, usageErr("%v", err)
	}
	return c, nil
}

// serviceOptions are the options of a service client (the hub's or DPS's)
// from the global flags and environment: CA file and endpoint.
func (a *app) serviceOptions(logName string) (service.Options, error) {
	ca := a.caFile
	if ca == "" {
		ca = a.getenv(envCAFile)
	}
	endpoint := a.endpoint
	if endpoint == "" {
		endpoint = a.getenv(envEndpoint)
	}
	if err := a.checkEndpoint(endpoint); err != nil {
		return service.Options{}, err
	}
	return service.Options{CAFile: ca, BaseURL: endpoint, UserAgent: "gwctl/1", Log: a.log.Named(logName)}, nil
}

// checkEndpoint refuses a plain-HTTP endpoint unless --insecure is given,
// and then says on stderr what that costs: every request carries a SAS
// token signed with the policy key, which grants everything the policy
// does (iothubowner: the whole hub) until it expires.
func (a *app) checkEndpoint(endpoint string) error {
	if endpoint == "" {
		return nil
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return usageErr("--endpoint %q is not a URL: %v", endpoint, err)
	}
	switch strings.ToLower(u.Scheme) {
	case "https":
		return nil
	case "http":
		if !a.insecure {
			return usageErr("--endpoint %s is plain HTTP: the service token, which grants the connection string's rights on the hub, "+
				"would go in clear text. Use an https:// endpoint (for gwhub: https://HOST:PORT with --ca-file DIR/ca.pem), "+
				"or add --insecure if the network path is trusted (e.g. loopback)", endpoint)
		}
		fmt.Fprintf(a.stderr, "gwctl: warning: --insecure: the service token goes to %s in clear text; anyone on the path can use it until it expires\n", endpoint)
		return nil
	default:
		return usageErr("--endpoint %q must be an https:// URL", endpoint)
	}
}

// withClient runs f with a client and closes its connections afterwards.
func (a *app) withClient(f func(c *service.Client) error) error {
	c, err := a.client()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	return f(c)
}

func (a *app) location() *time.Location {
	if a.loc != nil {
		return a.loc
	}
	return time.Local
}

// printJSON writes v indented.
func (a *app) printJSON(v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding output: %w", err)
	}
	_, err = fmt.Fprintf(a.stdout, "%s\n", b)
	return err
}

// failure turns an error from the service into a message an operator can
// act on and an exit code. device is the device the call was about.
func failure(err error, device string) error {
	if err == nil {
		return nil
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return err
	}
	if errors.Is(err, context.Canceled) {
		return &exitError{code: exitCanceled, msg: "interrupted", err: err}
	}
	if errors.Is(err, service.ErrInvalid) {
		return &exitError{code: exitUsage, msg: strings.TrimPrefix(err.Error(), "service: "), err: err}
	}
	var se *iothub.ServiceError
	if errors.As(err, &se) {
		return &exitError{code: exitFailure, msg: serviceMessage(se, device), err: err}
	}
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var cv *tls.CertificateVerificationError
	if errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &cv) {
		return &exitError{code: exitFailure, err: err,
			msg: fmt.Sprintf("cannot verify the hub's TLS certificate (for a local hub pass its CA with --ca-file): %v", err)}
	}
	var ne net.Error
	var oe *net.OpError
	if errors.As(err, &oe) || errors.As(err, &ne) {
		return &exitError{code: exitFailure, msg: fmt.Sprintf("cannot reach the hub: %v", err), err: err}
	}
	return &exitError{code: exitFailure, msg: err.Error(), err: err}
}

func serviceMessage(se *iothub.ServiceError, device string) string {
	code := se.Code
	if code == 0 {
		code = se.HTTPStatus
	}
	switch {
	case se.Code == iothub.CodeDeviceNotOnline:
		return fmt.Sprintf("device %s is not online (%d)", device, code)
	case se.Code == iothub.CodeDeviceNotFound:
		return fmt.Sprintf("device %s is not registered on the hub (%d)", device, code)
	case se.Code == iothub.CodeDeviceAlreadyExists:
		return fmt.Sprintf("device %s already exists (%d)", device, code)
	case se.Code == iothub.CodeGatewayTimeout:
		return fmt.Sprintf("device %s did not answer in time (%d)", device, code)
	case se.Code == iothub.CodePreconditionFailed || se.HTTPStatus == 412:
		return fmt.Sprintf("the etag given is not current: %s changed since it was read (%d)", device, code)
	case se.Code == iothub.CodeDeviceMaximumInflightMethods:
		return fmt.Sprintf("device %s has too many method calls in flight (%d)", device, code)
	case se.HTTPStatus == 401:
		return fmt.Sprintf("the hub refused the credentials: check the connection string (%d): %s", code, se.Message)
	case se.HTTPStatus == 429:
		return fmt.Sprintf("the hub is throttling requests, try again later (%d)", code)
	}
	return fmt.Sprintf("hub answered HTTP %d, error %d: %s", se.HTTPStatus, code, se.Message)
}

// exactArgs is cobra.ExactArgs with a usage exit code and named arguments.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(names) == 0 && len(args) > 0 {
			return usageErr("%s takes no arguments, got %q (see %s --help)", cmd.CommandPath(), args[0], cmd.CommandPath())
		}
		if len(args) != len(names) {
			return usageErr("want %d argument(s): %s", len(names), strings.Join(names, " "))
		}
		return nil
	}
}
