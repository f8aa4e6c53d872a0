module msmqplugins

// go:wasmexport needs Go 1.24; no external modules, so it builds offline.
go 1.24
