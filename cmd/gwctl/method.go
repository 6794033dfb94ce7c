package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/spf13/cobra"

	"github.com/gwagent/gwagent/iothub"
	"github.com/gwagent/gwagent/iothub/service"
)

// methodTimeouts are the flags every method call takes.
type methodTimeouts struct {
	response time.Duration
	connect  time.Duration
}

func (m *methodTimeouts) register(cmd *cobra.Command, responseFlag string) {
	cmd.Flags().DurationVar(&m.response, responseFlag, 30*time.Second, "how long the hub waits for the device's answer (5s to 5m)")
	cmd.Flags().DurationVar(&m.connect, "connect-timeout", 0, "how long the hub waits for an offline device to connect (0 to 5m)")
}

func (m *methodTimeouts) seconds(responseFlag string) (resp, conn int, err error) {
	resp = int(math.Ceil(m.response.Seconds()))
	conn = int(math.Ceil(m.connect.Seconds()))
	if resp < iothub.MinMethodResponseTimeout || resp > iothub.MaxMethodResponseTimeout {
		return 0, 0, usageErr("--%s must be between %ds and %ds", responseFlag, iothub.MinMethodResponseTimeout, iothub.MaxMethodResponseTimeout)
	}
	if conn < 0 || conn > iothub.MaxMethodConnectTimeout {
		return 0, 0, usageErr("--connect-timeout must be between 0 and %ds", iothub.MaxMethodConnectTimeout)
	}
	return resp, conn, nil
}

// invoke calls a method with the timeouts of the flags.
func (a *app) invoke(ctx context.Context, c *service.Client, id, name string, payload json.RawMessage, t *methodTimeouts, responseFlag string) (iothub.MethodResult, error) {
	resp, conn, err := t.seconds(responseFlag)
	if err != nil {
		return iothub.MethodResult{}, err
	}
	res, err := c.InvokeMethod(ctx, id, iothub.MethodRequest{MethodName: name, Payload: payload,
		ResponseTimeoutInSeconds: resp, ConnectTimeoutInSeconds: conn})
	var se *iothub.ServiceError
	if errors.As(err, &se) && se.Code == iothub.CodeDeviceNotOnline {
		return iothub.MethodResult{}, &exitError{code: exitFailure, err: err, msg: offlineMessage(id, conn)}
	}
	if err != nil {
		return iothub.MethodResult{}, failure(err, id)
	}
	return res, nil
}

// offlineMessage says what to do about a device the hub has no connection
// from (404103): the hub does not queue method calls, but waits for the
// device for up to --connect-timeout.
func offlineMessage(id string, connectTimeout int) string {
	msg := fmt.Sprintf("device %s is not online (%d): the hub has no connection from it", id, iothub.CodeDeviceNotOnline)
	if connectTimeout > 0 {
		return msg + fmt.Sprintf(" and it did not connect within --connect-timeout %ds", connectTimeout)
	}
	return msg + fmt.Sprintf("; start its agent, or add --connect-timeout 60s to wait up to that long for it to connect (at most %ds)", iothub.MaxMethodConnectTimeout)
}

func (a *app) methodCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "method", Short: "Invoke direct methods"}
	var payload string
	var timeouts methodTimeouts
	invoke := &cobra.Command{
		Use:   "invoke ID NAME [--payload JSON]",
		Short: "Invoke a direct method and print the device's {status, payload}",
		Long: `Invoke a direct method on a connected device and print its answer as
{"status": <device status>, "payload": <device JSON>}. The exit code is 1 when
the call fails or the device's status is 400 or more.`,
		Args: exactArgs("ID", "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var p json.RawMessage
			if payload != "" {
				if !json.Valid([]byte(payload)) {
					return usageErr("--payload is not valid JSON: %s", payload)
				}
				p = json.RawMessage(payload)
			}
			if !iothub.ValidMethodName(args[1]) {
				return usageErr("%q is not a valid method name", args[1])
			}
			return a.withClient(func(c *service.Client) error {
				res, err := a.invoke(cmd.Context(), c, args[0], args[1], p, &timeouts, "timeout")
				if err != nil {
					return err
				}
				if len(res.Payload) == 0 {
					res.Payload = json.RawMessage("null")
				}
				if err := a.printJSON(res); err != nil {
					return err
				}
				if res.Status >= 400 {
					return &exitError{code: exitFailure, msg: fmt.Sprintf("device %s answered %s with status %d", args[0], args[1], res.Status)}
				}
				return nil
			})
		},
	}
	invoke.Flags().StringVar(&payload, "payload", "", "method payload (JSON)")
	timeouts.register(invoke, "timeout")
	cmd.AddCommand(invoke)
	return cmd
}
